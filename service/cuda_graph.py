"""Replaying a captured CUDA graph: fixed device buffers for a model whose shapes never change.

With `enable_cuda_graph`, ONNX Runtime's CUDA provider records the model's kernel launches on
its first run and afterwards replays them as one graph, which saves the per-kernel launch cost
that dominates small models. A replay reads and writes the very addresses the capture used, so
every input and output is bound once to a buffer on the GPU; a call copies its inputs into those
buffers, replays, and copies the outputs out. The buffers are shared, so calls to one such model
run one at a time (the lock), and only models whose every input and output has a fixed shape
qualify (`qualifies`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort


class Spec(Protocol):
    """What a graph needs of an input or output: `service.runtime.TensorSpec` fits."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def numpy_dtype(self) -> np.dtype: ...


def qualifies(specs: Iterable[Spec]) -> bool:
    """Every dimension fixed, and every tensor numeric (strings cannot live on the GPU)."""
    return all(all(d >= 0 for d in s.shape) and s.numpy_dtype != np.dtype(object) for s in specs)


class CudaGraph:
    """The device buffers and binding of one session created with `enable_cuda_graph`.

    `device` "cpu" binds host buffers the same way (no graph is captured there): the tests of
    the buffer logic run on machines without a GPU.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        inputs: Sequence[Spec],
        outputs: Sequence[Spec],
        device_id: int,
        device: str = "cuda",
    ) -> None:
        self._session = session
        self._lock = threading.Lock()
        self._inputs = {s.name: _buffer(s, device, device_id) for s in inputs}
        self._outputs = {s.name: _buffer(s, device, device_id) for s in outputs}
        self._binding = session.io_binding()
        for name, value in self._inputs.items():
            self._binding.bind_ortvalue_input(name, value)
        for name, value in self._outputs.items():
            self._binding.bind_ortvalue_output(name, value)

    def run(
        self, feeds: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Copy `feeds` in, replay (the first call captures), copy the outputs out: copies,
        since the next call overwrites the buffers (a host buffer's `numpy()` is a view)."""
        with self._lock:
            for name, array in feeds.items():
                self._inputs[name].update_inplace(np.ascontiguousarray(array))
            self._session.run_with_iobinding(self._binding)
            return {name: np.array(self._outputs[name].numpy()) for name in output_names}


def _buffer(spec: Spec, device: str, device_id: int) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_shape_and_type(
        list(spec.shape), spec.numpy_dtype, device, device_id
    )
