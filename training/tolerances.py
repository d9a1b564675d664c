"""Every tolerance a check in training/ verifies against, keyed by (check, dtype).

Three checks, each with its own rule, so their numbers are not interchangeable:

* ``"fold"``: the PyTorch folder's self-check (training.fold). The folded model, against a
  float64 copy of the original on a probe batch, may be off by at most twice the unfolded
  model's own error in its dtype, plus this tolerance times (1 + max|y|).
* ``"export"``: the exported ONNX file in ONNX Runtime against the unfolded float32 PyTorch model
  on the validation data: max|diff| at most this tolerance times (1 + max|y|). fp16 keeps 11
  significant bits and bf16 8, so their files can only agree to that precision.
* ``"fold-onnx"``: a folded ONNX file against the original, both in ONNX Runtime with every
  optimisation off: ``numpy.allclose`` with rtol = atol = this tolerance on every compared
  tensor. float16 keeps about 3 decimal digits, and a fold reorders its rounding.

``dtype`` is the name torch and numpy share ("float32", "float16", "bfloat16", "float64"); a
dtype without an entry of its own is judged as float32. This module imports nothing, so the ONNX
folder reads it without torch.
"""

from __future__ import annotations

from typing import Literal

Check = Literal["fold", "export", "fold-onnx"]

TOLERANCES: dict[tuple[Check, str], float] = {
    ("fold", "float64"): 1e-10,
    ("fold", "float32"): 1e-6,
    ("fold", "float16"): 4e-3,
    ("fold", "bfloat16"): 3e-2,
    ("export", "float32"): 1e-4,
    ("export", "float16"): 1e-2,
    ("export", "bfloat16"): 6e-2,
    ("fold-onnx", "float64"): 1e-4,
    ("fold-onnx", "float32"): 1e-4,
    ("fold-onnx", "float16"): 1e-2,
    ("fold-onnx", "bfloat16"): 1e-2,
}


def tolerance(check: Check, dtype: str) -> float:
    """The tolerance of `check` for values of `dtype`; float32's for a dtype not listed."""
    return TOLERANCES.get((check, dtype), TOLERANCES[(check, "float32")])
