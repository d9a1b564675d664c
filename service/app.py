"""`create_app(settings)`: assembles the service and nothing else.

Models load in the background once the server is up, so liveness answers at once and
readiness turns true when every required model has a version serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp

from foldserve import __version__
from service.deps import Services
from service.errors import install_handlers
from service.executor import Executor
from service.manager import ModelManager
from service.metrics import Metrics
from service.middleware import AccessLogMiddleware, BodyLimitMiddleware, DecompressMiddleware
from service.protocol import Limits
from service.routes import classify, docs, health, infer, models, prometheus, repository, ui
from service.runtime import RuntimeOptions
from service.schemas import REQUEST_MODELS
from service.settings import Settings
from service.stats import StatsBook

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Serves every model of the repository through ONNX Runtime over the Open Inference "
    "Protocol (KServe v2 / Triton HTTP), with Triton's binary tensor data, classification, "
    "model repository, model configuration and statistics extensions."
)


def build_services(settings: Settings) -> Services:
    options = RuntimeOptions.from_settings(settings)
    stats = StatsBook()
    metrics = Metrics(stats)
    manager = ModelManager(settings.repository, options, settings.models)
    limits = Limits(settings.max_tensor_elements, settings.max_request_batch_size)
    executor = Executor(stats, metrics)
    return Services(settings, options, manager, executor, stats, metrics, limits)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    services: Services = app.state.services
    logger.info(
        "repository %s, providers %s",
        services.settings.repository.resolve(),
        ",".join(services.options.providers),
    )
    loading = asyncio.create_task(services.manager.start(), name="load-models")
    try:
        yield
    finally:
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)


def create_app(settings: Settings) -> ASGIApp:
    """The service: FastAPI for every route, with the infer hot path and the middlewares every
    request needs (access log and metrics, body limits, compressed bodies) wrapped around it
    from outside, so that an inference, or a refusal under overload, skips FastAPI's own
    middleware stack (its error, telemetry and body-limit layers: a tenth of a refusal)."""
    api = _fastapi_app(settings)
    services: Services = api.state.services
    app: ASGIApp = infer.InferFastPath(api, services)
    app = DecompressMiddleware(app, max_bytes=settings.max_decompressed_bytes)
    app = BodyLimitMiddleware(
        app, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
    )
    return AccessLogMiddleware(
        app,
        metrics=services.metrics,
        request_id_header=settings.request_id_header,
        enabled=settings.access_log,
    )


def _fastapi_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="foldserve",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan,
    )
    app.state.services = build_services(settings)
    for module in (health, models, classify, repository, prometheus, docs, ui):
        app.include_router(module.router)
    docs.mount_docs_assets(app)
    infer.mount_infer_routes(app)
    ui.mount_static(app)
    install_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies the routes read by hand, declared in full."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        infer.document(schema)  # the infer hot path is a plain Starlette route
        app.openapi_schema = schema
    return app.openapi_schema
