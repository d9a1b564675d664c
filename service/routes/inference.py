"""Inference: the v2 `infer` endpoint (JSON and binary tensors), and `classify` for people.

`infer` reads the raw body itself: it may be JSON followed by binary tensors, with no
Content-Type at all (the official client sends none), so FastAPI's body parsing stays out and
the OpenAPI schema is declared explicitly instead.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from foldserve.model_metadata import InputSpec
from service import protocol
from service.deps import Authorized, ServicesDep
from service.errors import BadRequestError
from service.preprocess import array_to_input, effective_spec, image_to_input, probabilities
from service.protocol import HEADER_LENGTH
from service.routes.models import AUTH_ERRORS
from service.schemas import ClassifyResponse, InferenceResponse, Prediction

router = APIRouter(tags=["inference"])

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
CLASSIFY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A PNG or JPEG image (multipart field 'file', or the raw body), or a JSON "
        "array of raw values in the model's value_range, shaped like one input or a batch.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "array",
                    "items": {"anyOf": [{"type": "number"}, {"type": "array"}]},
                }
            },
        },
    }
}


@router.post(
    "/v2/models/{name}/infer",
    response_model=InferenceResponse,
    responses=AUTH_ERRORS,
    dependencies=Authorized,
    openapi_extra=INFER_BODY,
    summary="Inference",
    operation_id="infer",
)
@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    response_model=InferenceResponse,
    responses=AUTH_ERRORS,
    dependencies=Authorized,
    openapi_extra=INFER_BODY,
    summary="Inference on a version",
    operation_id="infer_version",
)
async def infer(
    request: Request, services: ServicesDep, name: str, version: str | None = None
) -> Response:
    model = services.manager.resolve(name, version)
    body = await request.body()
    executor = services.executor
    with executor.track(model) as tracking:
        parsed = protocol.parse_infer_request(body, request.headers.get(HEADER_LENGTH), model)
        results = await executor.run(
            model, parsed.feeds, parsed.output_names, parsed.batch_size, tracking
        )
        content, headers = protocol.encode_response(model, parsed, results)
    media_type = headers.pop("Content-Type")
    return Response(content, media_type=media_type, headers=headers)


@router.post(
    "/v2/models/{name}/classify",
    response_model=ClassifyResponse,
    responses=AUTH_ERRORS,
    dependencies=Authorized,
    openapi_extra=CLASSIFY_BODY,
    summary="Classify an image or array",
    operation_id="classify",
)
@router.post(
    "/v2/models/{name}/versions/{version}/classify",
    response_model=ClassifyResponse,
    responses=AUTH_ERRORS,
    dependencies=Authorized,
    openapi_extra=CLASSIFY_BODY,
    summary="Classify with a version",
    operation_id="classify_version",
)
async def classify(
    request: Request,
    services: ServicesDep,
    name: str,
    version: str | None = None,
    top_k: Annotated[int, Query(ge=1, le=1000, description="labels to return")] = 5,
) -> ClassifyResponse:
    """Top-k labels with probabilities, preprocessing as the model's metadata says."""
    model = services.manager.resolve(name, version)
    meta = model.metadata
    if meta is None:
        raise BadRequestError(
            f"model {name!r} carries no foldserve metadata (labels, input spec); use /infer"
        )
    entry = services.manager.entry_or_none(name)
    spec = effective_spec(meta.input, entry.config.preprocessing) if entry else meta.input
    with services.executor.track(model) as tracking:
        batch = await _classify_input(request, spec)
        input_spec = model.input(meta.input.name)
        dtype = input_spec.datatype.dtype if input_spec else np.dtype(np.float32)
        feeds = {meta.input.name: batch.astype(dtype)}
        results = await services.executor.run(
            model, feeds, [meta.output.name], batch.shape[0], tracking
        )
        probs = probabilities(results[meta.output.name], meta.output.softmax_applied)
    return ClassifyResponse(
        model_name=model.name,
        model_version=str(model.version),
        predictions=[_top(row, top_k, meta.labels) for row in probs],
    )


async def _classify_input(request: Request, spec: InputSpec) -> np.ndarray:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return image_to_input(await _upload(request), spec)
    body = await request.body()
    if content_type == "application/json":
        return array_to_input(protocol.load_json_array(body), spec)
    return image_to_input(body, spec)


async def _upload(request: Request) -> bytes:
    try:
        async with request.form(max_files=1, max_fields=10) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise BadRequestError("multipart body lacks a 'file' part holding the image")
            return await upload.read()
    except MultiPartException as exc:
        raise BadRequestError(f"malformed multipart body: {exc.message}") from None


def _top(row: np.ndarray, k: int, labels: tuple[str, ...]) -> list[Prediction]:
    order = np.argsort(-row, kind="stable")[:k]
    return [
        Prediction(
            index=int(i), label=labels[i] if i < len(labels) else None, probability=float(row[i])
        )
        for i in order
    ]
