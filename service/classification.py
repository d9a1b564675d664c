"""Triton's classification extension: an output's top-k as `"<value>:<index>[:<label>]"` strings.

For a batched output the result has shape [batch, k], each row ranking the flattened non-batch
elements of one item; otherwise [k] over the whole tensor. k larger than the number of classes
returns them all, as Triton does. Values print as the shortest text that reads back to the same
number in the output's own datatype (numpy's repr of the scalar).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest values of a 1-d array, highest first; ties keep index order."""
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    return order[: min(k, scores.size)]


def _entry(value: np.generic, index: int, labels: Sequence[str] | None) -> str:
    text = f"{value!s}:{index}"
    if labels is not None and index < len(labels):
        text += f":{labels[index]}"
    return text


def _rank(row: np.ndarray, k: int, labels: Sequence[str] | None) -> list[str]:
    flat = row.ravel()
    return [_entry(flat[i], int(i), labels) for i in top_k(flat, k)]


def classify_output(
    array: np.ndarray, k: int, batched: bool, labels: Sequence[str] | None
) -> np.ndarray:
    """The BYTES tensor that replaces `array` in the response."""
    if batched and array.ndim >= 1:
        rows = [_rank(item, k, labels) for item in array]
        width = min(k, int(np.prod(array.shape[1:], dtype=np.int64)))
        return np.array(rows, dtype=object).reshape(len(rows), width)
    return np.array(_rank(array, k, labels), dtype=object)
