"""`classify`: top-k labels for an image or an array, preprocessed as the model's metadata says.

The endpoint for people and scripts that have a picture rather than a tensor; the v2 `infer`
endpoint, the hot path, is `infer.py`.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from foldserve.model_metadata import InputSpec
from service import protocol
from service.deps import Authorized, ServicesDep
from service.errors import BadRequestError
from service.preprocess import array_to_input, effective_spec, image_to_input, probabilities
from service.routes.responses import AUTH_ERRORS
from service.routes.versioned import with_and_without_version
from service.schemas import ClassifyResponse, Prediction

router = APIRouter(tags=["inference"])

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


@with_and_without_version(
    router.post,
    "/classify",
    summary=("Classify an image or array", "Classify with a version"),
    operation_id=("classify", "classify_version"),
    response_model=ClassifyResponse,
    responses=AUTH_ERRORS,
    dependencies=Authorized,
    openapi_extra=CLASSIFY_BODY,
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
    with services.executor.admit(model), services.executor.track(model) as tracking:
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
    settings = request.app.state.services.settings
    pixels = settings.max_image_pixels
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return image_to_input(await _upload(request), spec, pixels)
    body = await request.body()
    if content_type == "application/json":
        values = protocol.load_json_array(body)
        return array_to_input(values, spec, settings.max_request_batch_size)
    return image_to_input(body, spec, pixels)


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
