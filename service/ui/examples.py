"""Copy-paste examples for a model page: curl against classify, and `tritonclient` against infer.

Written for the address the page was reached on and the version shown, so they work when
pasted. With a token configured they read it from `$FOLDSERVE_API_TOKEN` instead of printing
it: the page is open, the token is not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from foldserve.model_metadata import InputSpec
from service.runtime import ModelVersion, TensorSpec

TOKEN_ENV = "FOLDSERVE_API_TOKEN"
MAX_INLINE_VALUES = 32  # a longer JSON example would bury the point under zeros


@dataclass(frozen=True)
class Example:
    title: str
    language: str
    code: str


def examples(
    base_url: str, model: ModelVersion, spec: InputSpec | None, top_k: int, token: bool
) -> list[Example]:
    """curl (classify, when the model has foldserve metadata) and tritonclient (infer)."""
    path = f"/v2/models/{model.name}/versions/{model.version}"
    found = [_curl(base_url + path, spec, top_k, token)] if spec is not None else []
    if model.inputs:
        found.append(_tritonclient(base_url, model, token))
    return found


def _curl(url: str, spec: InputSpec, top_k: int, token: bool) -> Example:
    auth = f' \\\n     -H "Authorization: Bearer ${TOKEN_ENV}"' if token else ""
    target = f"'{url}/classify?top_k={top_k}'"
    if spec.layout == "NCHW":
        body = " \\\n     -F file=@picture.png"
        title = "Classify a picture (PNG or JPEG) with curl"
    else:
        size = math.prod(spec.shape)
        values = [spec.value_range[0]] * size if size <= MAX_INLINE_VALUES else None
        data = json.dumps(values) if values else f"<a JSON array shaped {list(spec.shape)}>"
        body = f" \\\n     -H 'Content-Type: application/json' -d '{data}'"
        title = "Classify raw values with curl"
    return Example(title, "shell", f"curl -s -X POST {target}{auth}{body}")


def _tritonclient(base_url: str, model: ModelVersion, token: bool) -> Example:
    host = base_url.split("://", 1)[-1].rstrip("/")
    headers = f'{{"Authorization": "Bearer " + os.environ["{TOKEN_ENV}"]}}' if token else "None"
    declared = ", ".join(
        f'httpclient.InferInput({_q(s.name)}, {_shape(s)}, "{s.datatype.name}")'
        for s in model.inputs
    )
    feeds = "\n".join(_triton_input(i, spec) for i, spec in enumerate(model.inputs))
    outputs = ", ".join(_q(o.name) for o in model.outputs)
    imports = "import os\n\n" if token else ""
    code = f"""{imports}import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("{host}")
inputs = [{declared}]
{feeds}
result = client.infer(
    {_q(model.name)}, inputs, model_version="{model.version}", headers={headers}
)
for name in [{outputs}]:
    print(name, result.as_numpy(name))
"""
    return Example("Infer with tritonclient (Python)", "python", code)


def _q(text: str) -> str:
    """A Python string literal for a name (JSON's quoting is valid Python here)."""
    return json.dumps(text)


def _shape(spec: TensorSpec) -> list[int]:
    """A batch of one where the model leaves a dimension open."""
    return [1 if d < 0 else d for d in spec.shape]


def _triton_input(index: int, spec: TensorSpec) -> str:
    dtype = spec.datatype.dtype.name
    return (
        f"inputs[{index}].set_data_from_numpy(np.zeros({_shape(spec)}, dtype=np.{dtype}))"
        "  # already normalised: what the model itself takes"
    )
