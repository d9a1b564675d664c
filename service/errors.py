"""The service's exceptions, and the one table that maps each to an HTTP status.

Routes and the modules beneath them raise these and never build error responses themselves:
`install_handlers` turns every `ServiceError` into `{"error": message}` with the status below,
the wire format of the Open Inference Protocol. The errors after the table never reach a client
as they are: each is caught where the service expects it and turned into one of the above, or
into a failed start-up. Anything else that escapes is a bug: the access-log middleware
(`middleware.py`) logs it once, with its traceback, and answers 500 with no trace.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error a client can be told about; the message is shown as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(ServiceError):
    """The request is malformed: JSON, shape, datatype, data length, names, parameters."""


class UnauthorizedError(ServiceError):
    """A token is configured and the request carries none, or the wrong one."""


class NotFoundError(ServiceError):
    """No such model, or no such version of it."""


class PayloadTooLargeError(ServiceError):
    """The body is larger than `max_body_bytes`; refused before it is read whole."""


class UnsupportedMediaTypeError(ServiceError):
    """A body in a format the endpoint does not take (an image it cannot decode, say)."""


class ModelNotReadyError(ServiceError):
    """The model is known but no version of it can serve now (unloaded, or failed to load)."""


class LoadFailedError(ServiceError):
    """A load request could not load any version it selected; the old ones keep serving."""


class InferenceFailedError(ServiceError):
    """ONNX Runtime failed on inputs that passed validation: the model's fault, not the client's.

    The client is told that an internal error occurred, nothing more: ONNX Runtime's own text
    (`detail`) names source files and C++ signatures, so it goes to the server log only.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class QueueFullError(ServiceError):
    """The model's batching queue is full: refused at once, with a hint when to come back."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ClientGoneError(ServiceError):
    """The client disconnected while its request waited; nobody reads the answer."""


# The one table. A subclass answers as the nearest class of its ancestry listed here.
STATUS: dict[type[ServiceError], int] = {
    BadRequestError: HTTPStatus.BAD_REQUEST,
    UnauthorizedError: HTTPStatus.UNAUTHORIZED,
    NotFoundError: HTTPStatus.NOT_FOUND,
    PayloadTooLargeError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    UnsupportedMediaTypeError: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    LoadFailedError: HTTPStatus.BAD_REQUEST,
    ModelNotReadyError: HTTPStatus.SERVICE_UNAVAILABLE,
    InferenceFailedError: HTTPStatus.INTERNAL_SERVER_ERROR,
    QueueFullError: HTTPStatus.SERVICE_UNAVAILABLE,
    ClientGoneError: 499,  # nginx's "client closed request": logged, never received
}


def status_of(exc: ServiceError) -> int:
    """The status of the nearest class in `exc`'s ancestry (its method resolution order) that
    the table lists; 500 for a `ServiceError` nobody mapped."""
    for cls in type(exc).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return int(status)
    return int(HTTPStatus.INTERNAL_SERVER_ERROR)


# ---------------------------------------------------------------- caught inside the service


class SettingsError(ValueError):
    """An invalid setting; the message is one line a person can act on. The server does not
    start (`foldserve serve`, `python -m service.main`)."""


class ModelConfigError(ValueError):
    """A config.json, or a load request's `config`, that does not parse or does not fit the
    schema; the load that read it fails with `LoadFailedError`."""


class VersionLoadError(Exception):
    """A version that cannot serve; the message is the reason reported in the index, and in the
    `ModelNotReadyError` or `LoadFailedError` of the requests that wanted it."""


class OnnxWireError(ValueError):
    """The bytes are not a protobuf message (a corrupt or truncated ONNX file); loading the
    version fails with `VersionLoadError`."""


class BodyRefusedError(Exception):
    """Raised into the app when a body passes a limit while it streams; the answer, 413 or 408,
    is already sent, and the body-limit middleware swallows this on its way out."""


# ---------------------------------------------------------------- responses


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    if status == HTTPStatus.UNAUTHORIZED:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _status_and_headers(exc: ServiceError) -> tuple[int, dict[str, str] | None]:
    """Per the table; server faults (500) are logged once. A 503 (not ready, queue full) is a
    state, not a fault: it shows in the metrics and the access log, and logging each one would
    cost a refusal under overload a third of its time."""
    status = status_of(exc)
    if status == HTTPStatus.INTERNAL_SERVER_ERROR:
        detail = getattr(exc, "detail", "")
        logger.error("%s: %s%s", type(exc).__name__, exc.message, f" ({detail})" if detail else "")
    if isinstance(exc, QueueFullError):
        return status, {"Retry-After": str(exc.retry_after_s)}
    return status, None


def error_response_for(exc: ServiceError) -> JSONResponse:
    """The response for `exc`, for FastAPI's exception handlers."""
    status, headers = _status_and_headers(exc)
    return error_response(status, exc.message, headers)


async def send_error(send: Send, exc: ServiceError) -> None:
    """The same response as `error_response_for`, written straight to ASGI `send`: the infer
    hot path answers refusals this way, without a Response object (a tenth of their time)."""
    status, headers = _status_and_headers(exc)
    if status == HTTPStatus.UNAUTHORIZED:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    body = json.dumps({"error": exc.message}, ensure_ascii=False, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    return error_response_for(exc)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter checks (query, path, form) answer 400 in the v2 shape."""
    return error_response(HTTPStatus.BAD_REQUEST, describe_validation(exc.errors()))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods, in the v2 shape instead of Starlette's `detail`."""
    return error_response(exc.status_code, str(exc.detail))


def describe_validation(errors: object) -> str:
    """One line per problem, `where: what`, from pydantic's error list."""
    if not isinstance(errors, list | tuple):
        return "invalid request"
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", ""))
    return "invalid request: " + "; ".join(parts)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
