"""The pages for people: `/` lists the models, `/models/{name}` shows one, with a try-out.

Read-only and open like the health endpoints: they show what the index, metadata and /metrics
already show to anyone. The try-out posts to the API's own classify endpoint from the browser,
so a configured token is still required there, and sent only when the user types it. Errors
come back as pages, with the message the API would give, instead of `{"error": ...}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.deps import ServicesDep
from service.errors import ServiceError, status_of
from service.ui import render, views
from service.ui.counters import read_counters

router = APIRouter(include_in_schema=False)
STATIC = "/static"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
VersionQuery = Annotated[str | None, Query(max_length=40, description="the version to show")]


@router.get("/", response_class=HTMLResponse)
async def index(services: ServicesDep) -> HTMLResponse:
    manager = services.manager
    return render.page(
        "index.html",
        rows=views.index_rows(manager),
        ready=manager.ready,
        not_ready_reason="" if manager.ready else manager.not_ready_reason(),
        providers=services.options.providers,
    )


@router.get("/models/{name}", response_class=HTMLResponse)
async def model_page(
    request: Request, services: ServicesDep, name: str, version: VersionQuery = None
) -> HTMLResponse:
    base_url = str(request.base_url).rstrip("/")
    try:
        page = views.model_page(services, name, version, base_url)
    except ServiceError as exc:
        return render.error_page(status_of(exc), exc.message)
    return render.page("model.html", page=page)


@router.get("/models/{name}/counters")
async def counters(
    services: ServicesDep, name: str, version: VersionQuery = None
) -> dict[str, Any]:
    """The live counters of the version a page shows, for its script to refresh them."""
    model = services.manager.resolve(name, version)
    found = read_counters(services.stats, services.metrics.registry, model.name, model.version)
    return {
        "model_name": model.name,
        "model_version": str(model.version),
        "counters": found.to_json(),
        "display": found.display(),
    }


def mount_static(app: FastAPI) -> None:
    """The pages' script, stylesheet and icon: served from here, so the pages work offline."""
    app.mount(STATIC, StaticFiles(directory=STATIC_DIR), name="ui-static")
