"""The v2 `infer` endpoint, the service's hot path: a raw ASGI handler dispatched before routing.

Why raw: for a small model, FastAPI's and Starlette's per-request machinery (its own
middleware stack, dependency injection, body models, matching against every included router,
Request and Response objects) costs more than the inference. So `InferFastPath`, wrapped
around the FastAPI app (`service/app.py`), sends `POST .../infer` straight to `handle_infer`,
which checks the token, admits the request (or refuses it with 503 before its body is read,
when the version's queue is full), reads the body, validates it by hand (`protocol.py`), runs
it through the executor (and its batcher) and writes the response itself. The middlewares
outside it (body limit, access log and HTTP metrics, the drain on shutdown) still apply; service
errors map to responses through the one table in `errors.py`. The same handler is also a plain
Starlette route, which answers what the fast path lets through (a GET gets 405), and the
OpenAPI entry that FastAPI cannot derive is written out here (`document`).

The body may be JSON followed by binary tensors, with no Content-Type at all (the official
client sends none): it is read raw and never parsed by the framework.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service import protocol
from service.deps import Services, check_authorization
from service.errors import ClientGoneError, ServiceError, send_error
from service.protocol import HEADER_LENGTH
from service.routes.responses import AUTH_ERRORS
from service.schemas import InferenceResponse

INFER_PATH = re.compile(r"/v2/models/([^/]+)/(?:versions/([^/]+)/)?infer")
_AUTHORIZATION = b"authorization"
_HEADER_LENGTH = HEADER_LENGTH.lower().encode("latin-1")


async def handle_infer(
    scope: Scope, receive: Receive, send: Send, services: Services, name: str, version: str | None
) -> None:
    authorization, header_length = _headers(scope)
    check_authorization(services.settings.token(), authorization)
    model = services.manager.resolve(name, version)
    executor = services.executor
    with executor.admit(model):  # a 503 now, before the body is read, if the version is full
        with executor.expecting(model):  # the batcher may wait for this body rather than leave
            body = await read_body(receive)
        with executor.track(model) as tracking:
            parsed = protocol.parse_infer_request(body, header_length, model, services.limits)
            # Slow models wait long enough in the queue for a disconnect to be worth noticing.
            disconnect = None if model.inline else receive
            results = await executor.run(
                model, parsed.feeds, parsed.output_names, parsed.batch_size, tracking, disconnect
            )
            content, headers = protocol.encode_response(model, parsed, results)
    raw = [(b"content-type", headers.pop("Content-Type").encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def _headers(scope: Scope) -> tuple[str | None, str | None]:
    """(Authorization, Inference-Header-Content-Length), the two headers infer reads."""
    authorization = header_length = None
    for key, value in scope["headers"]:
        if key == _AUTHORIZATION:
            authorization = value.decode("latin-1")
        elif key == _HEADER_LENGTH:
            header_length = value.decode("latin-1")
    return authorization, header_length


async def read_body(receive: Receive) -> bytes:
    """The whole body; `ClientGoneError` if the client leaves first. The body limit is the
    middleware's, which counts what passes through `receive`."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError("the client disconnected while sending the body")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Endpoint:
    """The Starlette route's endpoint, an ASGI app (so Starlette adds no Request/Response
    wrapping): the same handler, with the path parameters the router found."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        services = scope["app"].state.services
        await _guarded(scope, receive, send, services, params["name"], params.get("version"))


async def _guarded(
    scope: Scope, receive: Receive, send: Send, services: Services, name: str, version: str | None
) -> None:
    try:
        await handle_infer(scope, receive, send, services, name, version)
    except ServiceError as exc:
        await send_error(send, exc)


INFER_ROUTES = (
    Route("/v2/models/{name}/infer", _Endpoint(), methods=["POST"], name="infer"),
    Route(
        "/v2/models/{name}/versions/{version}/infer",
        _Endpoint(),
        methods=["POST"],
        name="infer_version",
    ),
)


class InferFastPath:
    """Sends `POST /v2/models/{name}[/versions/{version}]/infer` to `handle_infer` before the
    FastAPI app (its middlewares and its routing); everything else goes on to the app."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                name, version = match.groups()
                # What the router would have set: the access log labels by route template.
                scope["route"] = INFER_ROUTES[0 if version is None else 1]
                await _guarded(scope, receive, send, self.services, name, version)
                return
        await self.app(scope, receive, send)


def mount_infer_routes(app: FastAPI) -> None:
    """The routes behind the fast path, first in the route list (`create_app` puts the fast
    path itself around the FastAPI app)."""
    app.router.routes[0:0] = INFER_ROUTES


# ---------------------------------------------------------------- OpenAPI, written out

INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "An $inference_request JSON object. With the binary tensor data "
        "extension, the JSON is followed by the inputs' bytes and the "
        f"{HEADER_LENGTH} header gives the JSON's length; Content-Type may be absent.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _operation(summary: str, operation_id: str, version: bool) -> dict[str, Any]:
    errors = {
        str(code): {
            "description": spec["description"],
            "content": {"application/json": {"schema": _ref("ErrorResponse")}},
        }
        for code, spec in {
            **AUTH_ERRORS,
            413: {"description": "body larger than max_body_bytes"},
            503: {"description": "model not ready, or its queue is full (with Retry-After)"},
        }.items()
    }
    return {
        "tags": ["inference"],
        "summary": summary,
        "operationId": operation_id,
        "security": [{"HTTPBearer": []}],
        "parameters": [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in (("name", "version") if version else ("name",))
        ],
        "responses": {
            "200": {
                "description": "The outputs: JSON alone, or JSON then binary outputs, the "
                f"{HEADER_LENGTH} response header giving the JSON's length",
                "content": {"application/json": {"schema": _ref("InferenceResponse")}},
            },
            **errors,
        },
        **INFER_BODY,
    }


INFER_PATHS: dict[str, dict[str, Any]] = {
    "/v2/models/{name}/infer": {"post": _operation("Inference", "infer", False)},
    "/v2/models/{name}/versions/{version}/infer": {
        "post": _operation("Inference on a version", "infer_version", True)
    },
}


def document(schema: dict[str, Any]) -> None:
    """Add the infer endpoint, which FastAPI does not see, to the app's OpenAPI schema."""
    schema.setdefault("paths", {}).update(INFER_PATHS)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    response = InferenceResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(response.pop("$defs", {}))
    components["InferenceResponse"] = response
