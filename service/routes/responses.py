"""The error responses routes declare in the OpenAPI document, each `{"error": message}`.

Declared, not enforced: what a route actually answers comes from the one table in `errors.py`.
"""

from __future__ import annotations

from typing import Any

from service.schemas import ErrorResponse

# What an endpoint that names a model (and perhaps a version) may answer.
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid model name or version"},
    404: {"model": ErrorResponse, "description": "unknown model or version"},
    503: {"model": ErrorResponse, "description": "model not ready (the reason says why)"},
}
# The same, for an endpoint that requires the token when the server has one (`deps.Authorized`).
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    **MODEL_ERRORS,
    401: {"model": ErrorResponse, "description": "token missing or wrong"},
}
