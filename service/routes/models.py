"""Per-model endpoints that describe: metadata, readiness, configuration and statistics.

Each exists with and without `/versions/{version}` (`versioned.py`); without it, the highest
serving version answers (Triton's choice).
"""

from __future__ import annotations

import dataclasses
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import Authorized, ServicesDep
from service.errors import ModelNotReadyError
from service.model_config import effective_config
from service.routes.responses import AUTH_ERRORS, MODEL_ERRORS
from service.routes.versioned import with_and_without_version
from service.runtime import ModelVersion
from service.schemas import ModelMetadataResponse, ModelReadyResponse, StatsResponse

router = APIRouter(tags=["models"])


# Registered first: otherwise "/v2/models/stats" would read as the metadata of a model "stats".
@router.get(
    "/v2/models/stats",
    response_model=StatsResponse,
    responses=AUTH_ERRORS,
    dependencies=Authorized,
    summary="Statistics of every loaded model",
    operation_id="all_model_stats",
)
async def all_stats(services: ServicesDep) -> StatsResponse:
    serving = services.manager.serving()
    return StatsResponse(model_stats=[_stats(services, m) for m in serving])


@with_and_without_version(
    router.get,
    "/stats",
    summary=("Model statistics", "Model version statistics"),
    operation_id=("model_stats", "model_version_stats"),
    response_model=StatsResponse,
    responses=AUTH_ERRORS,
    dependencies=Authorized,
)
async def model_stats(
    services: ServicesDep, name: str, version: str | None = None
) -> StatsResponse:
    manager = services.manager
    if version is not None:
        return StatsResponse(model_stats=[_stats(services, manager.resolve(name, version))])
    manager.resolve(name)  # 404 or 503 with the reason, as for the other model endpoints
    serving = [m for m in manager.serving() if m.name == name]
    return StatsResponse(model_stats=[_stats(services, m) for m in serving])


def _stats(services: ServicesDep, model: ModelVersion) -> dict[str, Any]:
    return services.stats.of(model.name, model.version).to_triton(model.name, model.version)


@with_and_without_version(
    router.get,
    "",
    summary=("Model metadata", "Model version metadata"),
    operation_id=("model_metadata", "model_version_metadata"),
    response_model=ModelMetadataResponse,
    responses=MODEL_ERRORS,
)
async def model_metadata(
    services: ServicesDep, name: str, version: str | None = None
) -> dict[str, Any]:
    """Inputs and outputs from the graph; labels and the exporter's record from its metadata."""
    model = services.manager.resolve(name, version)
    entry = services.manager.entry_or_none(name)
    # Where it runs: the execution providers ONNX Runtime actually uses, in order.
    parameters: dict[str, Any] = {"version": str(model.version), "providers": model.providers}
    if model.metadata is not None:
        parameters["labels"] = list(model.metadata.labels)
        parameters["foldserve"] = dataclasses.asdict(model.metadata)
    if entry is not None and entry.failures:
        parameters["failed_versions"] = {str(v): r for v, r in sorted(entry.failures.items())}
    return {
        "name": model.name,
        "versions": [str(v) for v in sorted(entry.serving)] if entry else [str(model.version)],
        "platform": "onnxruntime_onnx",
        "inputs": [s.describe() for s in model.inputs],
        "outputs": [s.describe() for s in model.outputs],
        "parameters": parameters,
    }


@with_and_without_version(
    router.get,
    "/ready",
    summary=("Model readiness", "Model version readiness"),
    operation_id=("model_ready", "model_version_ready"),
    response_model=ModelReadyResponse,
    responses=MODEL_ERRORS,
)
async def model_ready(services: ServicesDep, name: str, version: str | None = None) -> JSONResponse:
    """200 when the model (version) can serve; 400 with the reason when it cannot."""
    try:
        services.manager.resolve(name, version)
    except ModelNotReadyError as exc:
        body = {"name": name, "ready": False, "error": exc.message}
        return JSONResponse(body, status_code=HTTPStatus.BAD_REQUEST)
    return JSONResponse({"name": name, "ready": True})


@with_and_without_version(
    router.get,
    "/config",
    summary=("Model configuration (Triton)", "Model version configuration (Triton)"),
    operation_id=("model_config", "model_version_config"),
    responses=MODEL_ERRORS,
)
async def model_config(
    services: ServicesDep, name: str, version: str | None = None
) -> dict[str, Any]:
    model = services.manager.resolve(name, version)
    entry = services.manager.entry_or_none(name)
    if entry is None:
        raise ModelNotReadyError(f"model {name!r} is not loaded")
    return effective_config(model, entry.config, services.settings, services.options)
