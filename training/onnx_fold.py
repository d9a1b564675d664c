"""Fold BatchNormalization into its neighbours in any ONNX file, and prove the result.

This is the entry point of `foldserve fold-onnx IN.onnx -o OUT.onnx`. It works on the ONNX
graph alone, whatever framework produced it, and imports neither torch nor anything of the
training code: only onnx, numpy and ONNX Runtime.

The work is split by concept, each module readable in one sitting:

* `onnx_fold_math`   — the float64 arithmetic of each fold (BN after/before Conv, ConvTranspose,
                        Gemm, MatMul), with no graph in sight;
* `onnx_fold_graph`  — reading a graph: producers, consumers, constants and their values;
* `onnx_fold_rules`  — `fold_onnx`: which BN folds where, and the explicit skip rules;
* `onnx_fold_edit`   — the rewrite mechanics, and the invariants every edit keeps;
* `onnx_fold_verify` — `verify_onnx_fold`: ONNX Runtime, optimisations off, original vs folded;
* `onnx_fold_file`   — `fold_onnx_file`: load, fold, check, verify, write atomically;
* `onnx_fold_report` — the report (its errors are in training.errors).
"""

from __future__ import annotations

from training.fold_records import FoldedBN, SkippedBN
from training.onnx_fold_file import fold_onnx_file, load_model, save_model
from training.onnx_fold_report import OnnxFoldReport, OnnxVerification, TensorDiff
from training.onnx_fold_rules import fold_onnx
from training.onnx_fold_verify import verify_onnx_fold

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
