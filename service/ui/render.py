"""HTML for people: Jinja2 templates with autoescaping, sent under a strict security policy.

Everything a page shows from a model file (labels, names, reasons, metadata) is escaped by
Jinja2's autoescape, so a crafted label cannot inject markup. On top of that the pages carry a
Content-Security-Policy that allows scripts, styles and connections from this origin only and
no inline script or style at all, so even an escaping bug could not run anything; the pages'
one script and stylesheet are files under /static. The policy goes on these pages only:
Swagger UI at /docs needs an inline script.
"""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from foldserve import __version__

TEMPLATES = Path(__file__).resolve().parent / "templates"
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # the states and counters are live
}

# autoescape for every template (they are all HTML); StrictUndefined turns a misspelt field
# into an error in the tests instead of an empty cell on the page.
_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,
)
_env.globals["foldserve_version"] = __version__


def page(template: str, status_code: int = HTTPStatus.OK, **context: Any) -> HTMLResponse:
    """A rendered template with the security headers."""
    html = _env.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def error_page(status: int, message: str) -> HTMLResponse:
    """An error as a page a person reads, with the same message the API would give."""
    title = HTTPStatus(status).phrase
    return page("error.html", status, title=title, status=status, message=message)
