"""LitServe with its own dynamic batching around the same ONNX Runtime session, as its docs
show: `decode_request` per request, `batch` stacks, one `predict` per batch, `unbatch`.

    python bench/baseline_litserve.py MODEL.onnx NAME PORT [MAX_BATCH] [BATCH_TIMEOUT_S]

It takes the same v2 JSON body as the service, at the same path (/v2/models/NAME/infer), so
one load generator body serves all three servers. One API server process and one inference
worker; ONNX Runtime gets one thread (bench/serve.py pins the whole server to one core).
"""

from __future__ import annotations

import sys
from typing import Any

import litserve as ls
import numpy as np
import onnxruntime as ort


class OnnxAPI(ls.LitAPI):
    def __init__(self, model: str, name: str, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            api_path=f"/v2/models/{name}/infer",
        )
        self.model = model
        self.name = name

    def setup(self, device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            self.model, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    # No annotation on `request`: LitServe builds its endpoint from it, and reads a plain JSON
    # body only when there is none.
    def decode_request(self, request) -> np.ndarray:
        tensor = request["inputs"][0]
        shape = tensor["shape"]
        return np.asarray(tensor["data"], dtype=np.float32).reshape(shape)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {self.input: x})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return [row[None] for row in output]

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {
            "model_name": self.name,
            "outputs": [
                {
                    "name": self.output,
                    "datatype": "FP32",
                    "shape": list(output.shape),
                    "data": output.ravel().tolist(),
                }
            ],
        }


def main() -> None:
    model, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    max_batch = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 0.005
    api = OnnxAPI(model, name, max_batch, timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(
        port=port,
        host="127.0.0.1",
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
