"""The wire objects of the v2 protocol and its extensions, as pydantic models for the OpenAPI docs.

The infer route validates by hand (`protocol.py`) because a body may be JSON followed by binary
tensors, and because FastAPI's per-request model machinery costs more than a small model's
inference; these models declare the same contract to people and to schemathesis.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from service.datatypes import NAMES

TENSOR_DATA_SCHEMA: dict[str, Any] = {
    "type": "array",
    "description": "Row-major tensor contents, flat or nested; numbers, booleans (BOOL) or "
    "strings (BYTES).",
    "items": {
        "anyOf": [
            {"type": "number"},
            {"type": "boolean"},
            {"type": "string"},
            {"type": "array", "items": {}},
        ]
    },
}
TensorData = Annotated[list[Any], WithJsonSchema(TENSOR_DATA_SCHEMA)]
Parameters = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "description": "Key/value parameters (strings, numbers, booleans).",
            "additionalProperties": {"type": ["string", "number", "integer", "boolean"]},
        }
    ),
]
Datatype = Literal[NAMES]  # Literal[("BOOL", ...)] is Literal["BOOL", ...]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestInput(_Wire):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Datatype
    parameters: Parameters | None = Field(
        None, description="'binary_data_size': bytes of this input in the binary part"
    )
    data: TensorData | None = None


class RequestOutput(_Wire):
    name: str
    parameters: Parameters | None = Field(
        None, description="'binary_data': return as binary; 'classification': top-k as strings"
    )


class InferenceRequest(_Wire):
    """$inference_request; with binary inputs, the JSON is followed by their bytes."""

    id: str | None = None
    parameters: Parameters | None = Field(
        None, description="'binary_data_output': return every output as binary"
    )
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Wire):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: TensorData | None = None


class InferenceResponse(_Wire):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class ErrorResponse(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataResponse(_Wire):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class RepositoryIndexRequest(_Wire):
    ready: bool = Field(False, description="only models ready for inference")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str
    reason: str


class RepositoryControlRequest(_Wire):
    parameters: Parameters | None = Field(
        None,
        description="load: 'config', a JSON string in the config.json schema that replaces the "
        "model's config.json for this load; unload: 'unload_dependents' (no effect: no ensembles)",
    )


class StatsResponse(BaseModel):
    model_stats: list[dict[str, Any]]


class Prediction(BaseModel):
    index: int
    label: str | None
    probability: float


class ClassifyResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[list[Prediction]] = Field(description="top-k per item of the batch")


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    InferenceRequest,
    RepositoryIndexRequest,
    RepositoryControlRequest,
)
