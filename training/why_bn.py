"""The "why BatchNorm" experiment: one architecture, with and without BN, over learning rates.

The claim under test (Ioffe & Szegedy 2015): BN lets a network train at larger learning rates and
converge in fewer epochs. Each run uses plain SGD with momentum at a constant learning rate, so no
schedule or adaptive step size hides the difference; the network without BN gets conv/linear
biases back in place of BN's beta. Runs that diverge (loss NaN or infinite) are recorded as such.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from training.atomic import atomic_write_text
from training.data import load_source, make_split
from training.errors import TrainingDivergedError
from training.plots import plot_why_bn
from training.train import (
    TrainConfig,
    build,
    evaluate,
    make_optimizer,
    seed_everything,
    tensors,
    train_epoch,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WhyBNConfig:
    base: TrainConfig
    lrs: tuple[float, ...] = (0.01, 0.1, 0.5)
    target_acc: float = 0.95  # "converged" = first epoch at or above this validation accuracy


def run_one(cfg: TrainConfig, split: Any, batch_norm: bool) -> dict[str, Any]:
    """Train one network; returns its per-epoch validation accuracy and whether it diverged."""
    seed_everything(cfg.seed)
    cfg = replace(cfg, model_options={**cfg.model_options, "batch_norm": batch_norm})
    train_x, train_y, val_x, val_y = tensors(split)
    model, _ = build(cfg, split.info)
    steps = math.ceil(len(train_y) / cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    val_acc: list[float] = []
    diverged = False
    for epoch in range(1, cfg.epochs + 1):
        try:
            train_epoch(model, optimizer, scheduler, train_x, train_y, cfg, epoch, progress=False)
        except TrainingDivergedError:
            diverged = True
            break
        val_acc.append(evaluate(model, val_x, val_y)["val_acc"])
    return {"lr": cfg.lr, "batch_norm": batch_norm, "val_acc": val_acc, "diverged": diverged}


def epochs_to(acc: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(acc) if a >= target), None)


def run(exp: WhyBNConfig, out_dir: str | Path) -> list[dict[str, Any]]:
    """All runs, then `why_bn.png`, `why_bn.json` and `why_bn.md` (the table) in `out_dir`."""
    out_dir = Path(out_dir)
    base = replace(exp.base, optimizer="sgd", schedule="constant")
    split = make_split(
        load_source(base.data, base.image_size, base.color_mode), base.val_fraction, base.seed
    )
    runs = []
    for lr in exp.lrs:
        for batch_norm in (True, False):
            result = run_one(replace(base, lr=lr), split, batch_norm)
            result["epochs_to_target"] = epochs_to(result["val_acc"], exp.target_acc)
            log.info("%s", table_row(result))
            runs.append(result)
    title = f"{base.model} on {split.info.source}: SGD, momentum 0.9, constant learning rate"
    plot_why_bn(runs, out_dir / "why_bn.png", title)
    atomic_write_text(out_dir / "why_bn.json", json.dumps(runs, indent=2) + "\n")
    atomic_write_text(out_dir / "why_bn.md", table(runs, exp.target_acc))
    return runs


def table_row(r: dict[str, Any]) -> str:
    final = f"{100 * r['val_acc'][-1]:.1f} %" if r["val_acc"] else "-"
    best = f"{100 * max(r['val_acc']):.1f} %" if r["val_acc"] else "-"
    reached = r["epochs_to_target"] if r["epochs_to_target"] is not None else "never"
    status = "diverged" if r["diverged"] else "ok"
    bn = "yes" if r["batch_norm"] else "no"
    return f"| {r['lr']:g} | {bn} | {final} | {best} | {reached} | {status} |"


def table(runs: list[dict[str, Any]], target: float) -> str:
    header = (
        f"| learning rate | BN | final val acc | best val acc | epochs to {100 * target:.0f} % "
        "| status |\n|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(table_row(r) for r in runs) + "\n"
