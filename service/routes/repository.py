"""Triton's model repository extension: index, load, unload.

Bodies are optional (the official client posts an empty body to the index), so they are read
by hand; a load's `parameters.config` is a JSON string in the config.json schema, used instead
of the model's config.json for that load.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service import protocol, repository
from service.deps import Authorized, ServicesDep
from service.errors import BadRequestError
from service.routes.responses import AUTH_ERRORS
from service.schemas import RepositoryIndexEntry

router = APIRouter(tags=["repository"])


def _body(schema: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


async def _optional_json(request: Request, what: str) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        return {}
    return protocol.load_json_object(body, what)


def _parameters(request: dict[str, Any]) -> dict[str, Any]:
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequestError("'parameters' must be an object")
    return params


@router.post(
    "/v2/repository/index",
    response_model=list[RepositoryIndexEntry],
    responses=AUTH_ERRORS,
    dependencies=Authorized,
    openapi_extra=_body("RepositoryIndexRequest"),
    summary="Repository index",
    operation_id="repository_index",
)
async def index(request: Request, services: ServicesDep) -> list[dict[str, Any]]:
    """Every model on disk or loaded, per version, with its state and the reason for it."""
    body = await _optional_json(request, "index request")
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise BadRequestError("'ready' must be true or false")
    return services.manager.index(ready_only)


@router.post(
    "/v2/repository/models/{name}/load",
    responses=AUTH_ERRORS,
    dependencies=Authorized,
    openapi_extra=_body("RepositoryControlRequest"),
    summary="Load or reload a model",
    operation_id="repository_load",
)
async def load(request: Request, services: ServicesDep, name: str) -> JSONResponse:
    """Loads the versions the policy selects beside those serving, warms them, then swaps."""
    repository.check_name(name)
    params = _parameters(await _optional_json(request, "load request"))
    config = params.get("config")
    if config is not None and not isinstance(config, str):
        raise BadRequestError("parameter 'config' must be a JSON string in the config.json schema")
    files = [k for k in params if k.startswith("file:")]
    if files:
        raise BadRequestError("loading model files sent in the request is not supported")
    versions = await services.manager.load(name, config)
    return JSONResponse({"name": name, "versions": [str(v) for v in versions]})


@router.post(
    "/v2/repository/models/{name}/unload",
    responses=AUTH_ERRORS,
    dependencies=Authorized,
    openapi_extra=_body("RepositoryControlRequest"),
    summary="Unload a model",
    operation_id="repository_unload",
)
async def unload(request: Request, services: ServicesDep, name: str) -> JSONResponse:
    repository.check_name(name)
    _parameters(await _optional_json(request, "unload request"))
    await services.manager.unload(name)
    return JSONResponse({"name": name})
