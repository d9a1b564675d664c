"""The tensor datatypes of the Open Inference Protocol, and how they map to numpy and ONNX Runtime.

Only types numpy holds natively are served: BF16 and the FP8 family would need ml_dtypes, which
the serving install does not carry, so a model using them is refused at load with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Datatype:
    name: str  # the v2 name: FP32, INT64, BOOL, BYTES, ...
    dtype: np.dtype
    onnx: str  # ONNX Runtime's type string

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def triton_config(self) -> str:
        """The name in Triton's model configuration (`TYPE_FP32`; BYTES is `TYPE_STRING`)."""
        return "TYPE_STRING" if self.name == "BYTES" else "TYPE_" + self.name


_TABLE = [
    ("BOOL", np.bool_, "tensor(bool)"),
    ("UINT8", np.uint8, "tensor(uint8)"),
    ("UINT16", np.uint16, "tensor(uint16)"),
    ("UINT32", np.uint32, "tensor(uint32)"),
    ("UINT64", np.uint64, "tensor(uint64)"),
    ("INT8", np.int8, "tensor(int8)"),
    ("INT16", np.int16, "tensor(int16)"),
    ("INT32", np.int32, "tensor(int32)"),
    ("INT64", np.int64, "tensor(int64)"),
    ("FP16", np.float16, "tensor(float16)"),
    ("FP32", np.float32, "tensor(float)"),
    ("FP64", np.float64, "tensor(double)"),
    ("BYTES", np.object_, "tensor(string)"),
]
BY_NAME: dict[str, Datatype] = {n: Datatype(n, np.dtype(d), o) for n, d, o in _TABLE}
BY_ONNX: dict[str, Datatype] = {t.onnx: t for t in BY_NAME.values()}
BYTES = BY_NAME["BYTES"]
NAMES = tuple(BY_NAME)


def from_onnx(type_string: str) -> Datatype:
    """The v2 datatype of an ONNX Runtime tensor type; `ValueError` for one not served."""
    if type_string not in BY_ONNX:
        raise ValueError(f"tensors of type {type_string} are not supported by this service")
    return BY_ONNX[type_string]


def from_numpy(dtype: np.dtype) -> Datatype:
    for datatype in BY_NAME.values():
        if datatype.dtype == dtype:
            return datatype
    if dtype.kind in "US":
        return BYTES
    raise ValueError(f"numpy dtype {dtype} has no v2 datatype")
