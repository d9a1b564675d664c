from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service import datatypes, tensors
from service.errors import BadRequestError

NUMERIC = [d for d in datatypes.BY_NAME.values() if d.name != "BYTES"]


@given(data=st.data(), datatype=st.sampled_from(NUMERIC))
def test_binary_and_json_round_trip(data: st.DataObject, datatype: datatypes.Datatype) -> None:
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4))
    array = data.draw(hnp.arrays(datatype.dtype, shape, elements={"allow_nan": False}))
    raw = tensors.to_binary(array)
    assert len(raw) == tensors.binary_size("t", datatype, shape)
    np.testing.assert_array_equal(tensors.from_binary("t", datatype, shape, memoryview(raw)), array)
    back = tensors.from_json("t", datatype, shape, tensors.to_json_data(array))
    np.testing.assert_array_equal(back, array)


def test_nested_and_flat_json_agree() -> None:
    fp32 = datatypes.BY_NAME["FP32"]
    nested = tensors.from_json("t", fp32, (2, 2), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(nested, tensors.from_json("t", fp32, (2, 2), [1, 2, 3, 4]))


def test_bytes_binary_round_trip() -> None:
    array = np.array(["a", "", "héllo"], dtype=object)
    back = tensors.from_binary("t", datatypes.BYTES, (3,), memoryview(tensors.to_binary(array)))
    assert back.tolist() == ["a", "", "héllo"]


@pytest.mark.parametrize(
    ("datatype", "data", "fragment"),
    [
        ("INT32", [1.5], "must be integers"),
        ("UINT8", [300], "out of range"),
        ("INT8", [True], "must be numbers"),
        ("BOOL", [1], "must be booleans"),
        ("FP32", [None], "mixed or out-of-range"),
        ("UINT64", [2**64], "out of range"),
        ("FP32", "abc", "must be a list"),
    ],
)
def test_json_values_must_fit(datatype: str, data: object, fragment: str) -> None:
    with pytest.raises(BadRequestError, match=fragment):
        tensors.from_json("t", datatypes.BY_NAME[datatype], (1,), data)


def test_uint64_beyond_int64_is_exact() -> None:
    got = tensors.from_json("t", datatypes.BY_NAME["UINT64"], (2,), [2**64 - 1, 1])
    assert got.tolist() == [2**64 - 1, 1]


def test_bool_binary_must_be_zero_or_one() -> None:
    with pytest.raises(BadRequestError, match="0 or 1"):
        tensors.from_binary("t", datatypes.BY_NAME["BOOL"], (2,), memoryview(b"\x00\x02"))
