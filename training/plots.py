"""PNG figures of training runs, rendered off-screen and written atomically."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.atomic import atomic_write_bytes


def _figure_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_history(epochs: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """Loss and accuracy per epoch, training beside validation."""
    plt = _pyplot()
    xs = [e["epoch"] for e in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ax_loss.plot(xs, [e[key] for e in epochs], marker=".", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "validation")):
        ax_acc.plot(xs, [100 * e[key] for e in epochs], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)


def plot_why_bn(runs: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """One panel per learning rate: validation accuracy with and without BatchNorm."""
    plt = _pyplot()
    lrs = sorted({r["lr"] for r in runs})
    fig, axes = plt.subplots(1, len(lrs), figsize=(4 * len(lrs), 3.6), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], lrs, strict=True):
        for run in (r for r in runs if r["lr"] == lr):
            accs = [100 * a if math.isfinite(a) else float("nan") for a in run["val_acc"]]
            label = ("with BN" if run["batch_norm"] else "without BN") + (
                " (diverged)" if run["diverged"] else ""
            )
            ax.plot(range(1, len(accs) + 1), accs, marker=".", label=label)
        ax.set(title=f"lr = {lr:g}", xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.suptitle(title)
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)
