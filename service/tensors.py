"""One tensor between the wire and numpy: JSON data (flat or nested) and binary data.

Every check that protects memory comes before an allocation: the element count of a shape is
compared with the bytes actually present (binary) or the elements actually parsed (JSON), so a
request declaring a huge shape with a small body is refused without allocating that shape.
Binary data is read with `numpy.frombuffer`, without a copy.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from service import datatypes
from service.datatypes import Datatype
from service.errors import BadRequestError

MAX_DIM = 2**63 - 1
_LENGTH = struct.Struct("<I")


def parse_shape(where: str, raw: Any) -> tuple[int, ...]:
    """A shape from JSON: a list of non-negative integers (not booleans, not floats)."""
    if not isinstance(raw, list):
        raise BadRequestError(f"{where}: 'shape' must be a list of non-negative integers")
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= MAX_DIM:
            raise BadRequestError(
                f"{where}: 'shape' must be a list of non-negative integers, got {raw[:8]!r}"
            )
    return tuple(raw)


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def from_json(where: str, datatype: Datatype, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """Decode `data` (flat or nested lists, row-major) into an array of `shape`."""
    if not isinstance(data, list):
        raise BadRequestError(f"{where}: 'data' must be a list (flat or nested) of values")
    try:
        array = np.array(data, dtype=object if datatype is datatypes.BYTES else None)
    except (ValueError, OverflowError, TypeError):
        raise BadRequestError(f"{where}: 'data' is a ragged or mixed nested list") from None
    count = element_count(shape)
    if array.size != count:
        raise BadRequestError(
            f"{where}: shape {list(shape)} holds {count} elements but 'data' has {array.size}"
        )
    if datatype.dtype.kind in "iu" and array.dtype.kind in "fO":
        array = _exact_integers(where, datatype, data)
    _check_kind(where, datatype, array)
    try:
        # A float beyond the datatype's range becomes an infinity, as IEEE-754 rounds it (the
        # NaN/Inf policy: computed, not refused); numpy's warning about it is noise in the log.
        with np.errstate(over="ignore"):
            return array.astype(datatype.dtype).reshape(shape)
    except (ValueError, OverflowError, TypeError):
        raise BadRequestError(f"{where}: 'data' does not convert to {datatype.name}") from None


def _exact_integers(where: str, datatype: Datatype, data: list[Any]) -> np.ndarray:
    """Integers beyond int64 (UINT64's upper half) make numpy infer float64 and lose digits;
    take them one by one instead (a rare path), refusing anything that is not an integer."""
    values = np.array(data, dtype=object).ravel()
    if not all(type(v) is int for v in values):
        raise BadRequestError(f"{where}: {datatype.name} data must be integers")
    try:
        return np.array(values.tolist(), dtype=datatype.dtype)
    except OverflowError:
        info = np.iinfo(datatype.dtype)
        raise BadRequestError(
            f"{where}: value out of range for {datatype.name} ({info.min}..{info.max})"
        ) from None


def _check_kind(where: str, datatype: Datatype, array: np.ndarray) -> None:
    """JSON values must fit the datatype: no strings for numbers, no 1.5 for INT32, no 300 for
    UINT8, and booleans only for BOOL (numpy would silently convert each of these)."""
    if array.size == 0:
        return
    kind, name = array.dtype.kind, datatype.name
    if name == "BYTES":
        if not all(isinstance(v, str) for v in array.flat):
            raise BadRequestError(f"{where}: BYTES data must be strings")
        return
    expected = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[datatype.dtype.kind]
    if kind not in expected:
        found = {"b": "booleans", "U": "strings", "O": "mixed or out-of-range values"}
        raise BadRequestError(
            f"{where}: {name} data must be "
            f"{'booleans' if name == 'BOOL' else 'numbers'}, got {found.get(kind, 'other values')}"
        )
    if datatype.dtype.kind in "iu":
        info = np.iinfo(datatype.dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise BadRequestError(
                f"{where}: value out of range for {name} ({info.min}..{info.max})"
            )


def binary_size(where: str, datatype: Datatype, shape: tuple[int, ...]) -> int | None:
    """Bytes the binary data of this tensor must have; None for BYTES (sizes are inline)."""
    if datatype is datatypes.BYTES:
        return None
    return element_count(shape) * datatype.itemsize


def from_binary(
    where: str, datatype: Datatype, shape: tuple[int, ...], buffer: memoryview
) -> np.ndarray:
    """Little-endian, row-major, no padding; the caller has checked the size already."""
    if datatype is datatypes.BYTES:
        return _bytes_from_binary(where, shape, buffer)
    array = np.frombuffer(buffer, dtype=datatype.dtype.newbyteorder("<"))
    if datatype.name == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise BadRequestError(f"{where}: BOOL binary data must be bytes 0 or 1")
    return array.reshape(shape)


def _bytes_from_binary(where: str, shape: tuple[int, ...], buffer: memoryview) -> np.ndarray:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes."""
    count = element_count(shape)
    if count > len(buffer) // _LENGTH.size + 1:
        raise BadRequestError(f"{where}: {count} BYTES elements cannot fit in {len(buffer)} bytes")
    items: list[str] = []
    pos = 0
    while pos < len(buffer):
        if pos + _LENGTH.size > len(buffer):
            raise BadRequestError(f"{where}: BYTES binary data is truncated")
        (length,) = _LENGTH.unpack_from(buffer, pos)
        pos += _LENGTH.size
        if pos + length > len(buffer):
            raise BadRequestError(f"{where}: BYTES binary data is truncated")
        items.append(bytes(buffer[pos : pos + length]).decode("utf-8", "surrogateescape"))
        pos += length
    if len(items) != count:
        raise BadRequestError(
            f"{where}: shape {list(shape)} holds {count} elements, data {len(items)}"
        )
    return np.array(items, dtype=object).reshape(shape)


def to_json_data(array: np.ndarray) -> list[Any]:
    """Flat, row-major, as Triton answers; BYTES as strings."""
    flat = array.ravel()
    if flat.dtype.kind in "OSU":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def json_ready(array: np.ndarray) -> np.ndarray | list[Any]:
    """What `orjson` (OPT_SERIALIZE_NUMPY) writes as the flat JSON data without a Python list:
    a contiguous numeric array of finite values; anything else as `to_json_data`'s list."""
    flat = np.ascontiguousarray(array).ravel()
    if not flat.dtype.isnative:
        return to_json_data(array)
    if flat.dtype.kind in "biu" or (
        flat.dtype.kind == "f" and flat.dtype.itemsize >= 2 and bool(np.isfinite(flat).all())
    ):
        return flat
    return to_json_data(array)


def to_binary(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OSU":
        parts = []
        for value in array.ravel():
            raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts += [_LENGTH.pack(len(raw)), raw]
        return b"".join(parts)
    little = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little).tobytes()
