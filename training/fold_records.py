"""What a fold did to one BatchNorm, in the vocabulary both folders share.

The PyTorch folder (training.fold) and the ONNX one (training.onnx_fold) report in these records,
so a reader of either report, or of the fold summary in a model's metadata, finds the same fields
meaning the same things:

* ``bn``: the BatchNorm's name (module path in PyTorch, node name in ONNX);
* ``layers`` and ``layer_types``: what it folded into, by name and by type;
* ``direction``: ``"bn-after"`` when the BN followed its layer and folded into the layer's output
  channels, ``"bn-before"`` when it fed the layer and folded into its input channels;
* ``exactness``: ``"exact"``, or ``"scale-only"`` when the BN's shift is zero and only weights
  are rescaled (exact even where an affine fold is not: zero padding, transposed convolutions);
* ``kind`` and ``reason`` of a skipped BN: a label from `SkipKind` for programs, and the sentence
  for people.

Plain data only (no torch, no onnx), so both folders and the exporter can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["bn-after", "bn-before"]
Exactness = Literal["exact", "scale-only"]
# Why a BatchNorm stayed. Both folders use the same label for the same obstacle:
# no-adjacent-layer  no foldable layer produces its input or consumes its output
# shared-output      the tensor between it and the layer is also read elsewhere
# axis-mismatch      its channel axis is not the layer's feature axis (or the counts differ)
# inexact            folding would change results (zero padding, a shift into a transposed
#                    convolution, per-position statistics)
# precision          folding is exact in theory but would cost visible rounding (a mean
#                    subtraction folded into the next layer)
# dtype-range        the folded values overflow the layer's dtype
# batch-statistics   it normalises with batch statistics (training mode), not stored ones
# no-running-stats   it keeps no running statistics at all (PyTorch track_running_stats=False)
# bad-statistics     its statistics hold NaN/inf or a negative variance
# not-constant       a parameter it or the layer needs is computed at run time (ONNX)
# unsupported-bn     a BatchNorm form the folder does not rewrite (an old opset, odd inputs)
# unsupported-layer  the layer's weight is transformed when it runs, or is not plain float
# multi-call-site    the layer is called at several places, so rewriting it changes them all
# sub-graph          it sits inside an If/Loop/Scan body, which is not rewritten (ONNX)
SkipKind = Literal[
    "no-adjacent-layer",
    "shared-output",
    "axis-mismatch",
    "inexact",
    "precision",
    "dtype-range",
    "batch-statistics",
    "no-running-stats",
    "bad-statistics",
    "not-constant",
    "unsupported-bn",
    "unsupported-layer",
    "multi-call-site",
    "sub-graph",
]


@dataclass(frozen=True)
class FoldedBN:
    """One BatchNorm folded into one layer (bn-after) or into every consumer (bn-before)."""

    bn: str
    layers: tuple[str, ...]
    layer_types: tuple[str, ...]
    direction: Direction
    exactness: Exactness
    max_rel_weight_change: float  # largest |W' - W| / max|W| over the layers folded into
    # A second op the fold rewrote besides the layer: ONNX's bias Add of a MatMul ("Add", or
    # "new Add" when the BN became one), or the Pad that now pads the BN's input. PyTorch folds
    # across pure layout ops only (flatten, view, ...), which change no value, so it is empty.
    via: str = ""


@dataclass(frozen=True)
class SkippedBN:
    """A BatchNorm left in the model, with a machine-readable kind and a readable reason."""

    bn: str
    kind: SkipKind
    reason: str
