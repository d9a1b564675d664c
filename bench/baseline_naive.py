"""The baseline a user would write in an afternoon: FastAPI, a pydantic body, a sync handler,
one `session.run` per request. bench/serve.py measures the service against it.

    NAIVE_MODEL=path/to/model.onnx uvicorn bench.baseline_naive:app --no-access-log

It takes the same v2 JSON body as the service (`inputs[0]` with `shape` and flat `data`), so
one load generator body serves both. ONNX Runtime gets one thread: the server has one core.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(
    os.environ["NAIVE_MODEL"], sess_options=options, providers=["CPUExecutionProvider"]
)
INPUT = session.get_inputs()[0].name
OUTPUT = session.get_outputs()[0].name


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[Tensor]


app = FastAPI()


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest) -> dict:
    tensor = request.inputs[0]
    x = np.array(tensor.data, dtype=np.float32).reshape(tensor.shape)
    (y,) = session.run([OUTPUT], {INPUT: x})
    return {
        "model_name": name,
        "outputs": [
            {"name": OUTPUT, "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}
        ],
    }
