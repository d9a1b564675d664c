"""Server metadata, liveness and readiness (Open Inference Protocol).

Per the spec a health endpoint answers 200 when true and a 4xx when false; Triton uses 400.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from foldserve import __version__
from service.deps import ServicesDep
from service.schemas import ErrorResponse, LiveResponse, ReadyResponse, ServerMetadata

router = APIRouter(tags=["health"])

SERVER_NAME = "foldserve"
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_repository",
    "model_configuration",
    "statistics",
]


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


@router.get("/v2/health/live", response_model=LiveResponse, summary="Server liveness")
async def live() -> LiveResponse:
    """The process answers: it is alive. Models loading or failing do not change this."""
    return LiveResponse(live=True)


@router.get(
    "/v2/health/ready",
    response_model=ReadyResponse,
    responses={400: {"model": ErrorResponse, "description": "not ready"}},
    summary="Server readiness",
)
async def ready(services: ServicesDep) -> JSONResponse:
    """Ready once started and every model required at start-up has a version serving."""
    manager = services.manager
    if manager.ready:
        return JSONResponse({"ready": True})
    body = {"ready": False, "error": manager.not_ready_reason()}
    return JSONResponse(body, status_code=HTTPStatus.BAD_REQUEST)
