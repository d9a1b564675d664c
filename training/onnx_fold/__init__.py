"""Fold BatchNormalization into its neighbours in any ONNX file, and prove the result.

This is the entry point of `foldserve fold-onnx IN.onnx -o OUT.onnx`. It works on the ONNX
graph alone, whatever framework produced it, and never imports torch: only onnx, numpy, ONNX
Runtime and the torch-free parts of training/ (errors, tolerances, fold_records, atomic), so
`pip install 'foldserve[onnx,cpu]'` is all it needs. Its records are the PyTorch folder's
(training.fold_records).

The work is split by concept, each module readable in one sitting:

* `algebra` — the float64 arithmetic of each fold (BN after/before Conv, ConvTranspose, Gemm,
              MatMul), with no graph in sight;
* `graph`   — reading a graph: producers, consumers, constants and their values;
* `rules`   — `fold_onnx`: which BN folds where, and the explicit skip rules;
* `edit`    — the rewrite mechanics, and the invariants every edit keeps;
* `verify`  — `verify_onnx_fold`: ONNX Runtime, optimisations off, original vs folded;
* `file`    — `fold_onnx_file`: load, fold, check, verify, write atomically;
* `report`  — the report and the verification record (the errors are in training.errors).
"""

from __future__ import annotations

from training.fold_records import FoldedBN, SkippedBN
from training.onnx_fold.file import fold_onnx_file, load_model, save_model
from training.onnx_fold.report import OnnxFoldReport, OnnxVerification, TensorDiff
from training.onnx_fold.rules import fold_onnx
from training.onnx_fold.verify import verify_onnx_fold

__all__ = [
    "FoldedBN",
    "OnnxFoldReport",
    "OnnxVerification",
    "SkippedBN",
    "TensorDiff",
    "fold_onnx",
    "fold_onnx_file",
    "load_model",
    "save_model",
    "verify_onnx_fold",
]
