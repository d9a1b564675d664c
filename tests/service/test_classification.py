from __future__ import annotations

import numpy as np

from service.classification import classify_output


def test_spec_example() -> None:
    out = classify_output(np.array([1.1, 3.3, 0.5, 2.4], np.float32), 2, False, None)
    assert out.tolist() == ["3.3:1", "2.4:3"]


def test_batched_with_labels_and_k_clamped() -> None:
    scores = np.array([[1, 5, 10, 4], [4, 3, 2, 1]], np.int32)
    out = classify_output(scores, 9, True, ["a", "b", "c", "d"])
    assert out.shape == (2, 4)
    assert out[0].tolist() == ["10:2:c", "5:1:b", "4:3:d", "1:0:a"]
    assert out[1, 0] == "4:0:a"
