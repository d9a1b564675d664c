"""The API docs page, `/docs`: Swagger UI over the OpenAPI document, working offline.

FastAPI's docs page loads Swagger UI from a CDN, which an offline machine cannot reach. Here
its assets come from the `swagger-ui-bundle` package, mounted under /docs-assets, so /docs
works with no network; /openapi.json stays the machine-readable source.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

router = APIRouter(include_in_schema=False)
DOCS_ASSETS = "/docs-assets"


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    """FastAPI's Swagger UI, its script and styles served from here instead of a CDN."""
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{request.app.title} — API docs",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
    )


def mount_docs_assets(app: FastAPI) -> None:
    """Swagger UI's files come from the `swagger-ui-bundle` package: the page works offline."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")
