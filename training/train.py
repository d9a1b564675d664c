"""Training loop for the BN model zoo: reads top to bottom, checkpoints every epoch.

config → data (stratified split, normalisation from the training part) → model → AdamW with a
one-cycle schedule → per epoch: train with a progress bar, validate in eval mode (running
statistics, never batch statistics), write checkpoint, history and plot atomically. `resume`
restores weights, optimizer, scheduler and RNG states from the last checkpoint and continues the
same run; epochs shuffle with a permutation seeded by (seed, epoch), so a resumed run ends with
the weights an uninterrupted one would have.

Under torchrun the same loop runs data-parallel (training.distributed): `batch_size` is per
process, every rank cuts the same permutation into global batches and trains on its slice,
BatchNorm is synchronised across processes by default, metrics are summed over ranks, and only
rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training import distributed, models
from training.atomic import atomic_write_text
from training.bn.layers import require_eval_mode
from training.bn.population import StatsHandle, Window, parse_bn_stats
from training.bn.recalibrate import recalibrate_bn
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import DataInfo, Split, load_source, make_split
from training.distributed import SINGLE, World
from training.errors import CheckpointError, ConfigError, DataError, TrainingDivergedError
from training.plots import plot_history

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"
PLOT_NAME = "curves.png"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run's result; stored in its checkpoint."""

    model: str = "digits_cnn"
    model_options: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    image_size: int = 32  # image folders only: images are resized to this square size
    color_mode: str = "L"  # image folders only: "L" (grey) or "RGB"
    val_fraction: float = 0.2
    epochs: int = 20
    batch_size: int = 64  # per process: the global batch is batch_size × world size
    lr: float = 1e-2  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9)
    schedule: str = "onecycle"  # "onecycle" or "constant"
    augment: bool = True  # images only: random shifts of up to one pixel
    label_smoothing: float = 0.0
    seed: int = 0
    bn_recalibrate: bool = False
    bn_stats: str = "ema"  # population statistics: ema, ema:<momentum>, window:<N>, cumulative
    sync_bn: bool | None = None  # synchronise BN across processes; None: when world size > 1

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, not {self.epochs}"),
            (self.batch_size >= 2, f"batch size must be at least 2, not {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be > 0, not {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, not {self.weight_decay}"),
            (0 < self.val_fraction < 1, f"val fraction must be in (0, 1), not {self.val_fraction}"),
            (self.optimizer in ("adamw", "sgd"), f"unknown optimizer {self.optimizer!r}"),
            (self.schedule in ("onecycle", "constant"), f"unknown schedule {self.schedule!r}"),
            (self.image_size >= 1, f"image size must be positive, not {self.image_size}"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        models.get_spec(self.model)  # unknown model names fail here, before any work
        parse_bn_stats(self.bn_stats)  # and so do unknown population statistics

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        return cls(**raw)


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]]
    data_info: DataInfo
    recalibration: dict[str, float] | None = None
    world: World = SINGLE

    @property
    def val_acc(self) -> float:
        if self.recalibration:
            return self.recalibration["val_acc_after"]
        return self.history[-1]["val_acc"]


# --------------------------------------------------------------------------- set-up


def seed_everything(seed: int, warn_only: bool = False) -> None:
    """Same seed, same threads, same machine → same bits (deterministic kernels only).

    `warn_only` is for CUDA, where some backward kernels (max-pool's) have no deterministic
    version and would otherwise stop the run.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)


def model_options_for(cfg: TrainConfig, info: DataInfo) -> dict[str, Any]:
    """Fill the model's input and class counts from the data unless the user set them."""
    spec = models.get_spec(cfg.model)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    derived: dict[str, Any] = {"num_classes": len(info.label_names)}
    if info.layout == "NCHW":
        channels, height, width = info.input_shape
        if height != width:
            raise ConfigError(f"model {cfg.model!r} takes square images, not {height}×{width}")
        derived |= {"in_channels": channels, "image_size": height}
        derived["imagenet_stem"] = height >= 64  # a 7×7/2 stem + pool would erase small images
    derived["in_features"] = int(np.prod(info.input_shape))
    if info.layout == "NC" and "in_channels" in fields:
        raise ConfigError(f"model {cfg.model!r} takes images; use 'mlp' for a table")
    chosen = {k: v for k, v in derived.items() if k in fields}
    return chosen | cfg.model_options


def build(cfg: TrainConfig, info: DataInfo) -> tuple[nn.Module, dict[str, Any]]:
    options = model_options_for(cfg, info)
    model = models.build_model(cfg.model, options)
    return model, dataclasses.asdict(model.config)


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    # No weight decay on BN affine parameters and biases: decaying gamma towards 0 fights BN.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.schedule == "onecycle":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch
        )
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return optimizer, scheduler


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Randomness of one epoch (shuffle, augmentation) as a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """This epoch's mini-batches: a seeded permutation, the last batch kept if it has > 1.

    A batch of one example has no variance, and BatchNorm refuses it in training mode.
    """
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels, replicating the border.

    Small translations are the cheapest label-preserving augmentation for digits; the edge is
    replicated so the shifted-in pixels look like background, not like a dark or bright frame.
    """
    return apply_shift(x, shift_offsets(len(x), generator, max_shift), max_shift)


def shift_offsets(n: int, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """The (row, column) offsets of `n` images, in [0, 2·max_shift]: the random part of a shift.

    Drawn for a whole global batch on every rank, so the generator stays in step everywhere.
    """
    return torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)


def apply_shift(x: torch.Tensor, offsets: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = offsets.to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + offsets[:, :1])[:, None, :, None]
    cols = (torch.arange(w, device=x.device)[None, :] + offsets[:, 1:])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


# --------------------------------------------------------------------------- one epoch


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    epoch: int,
    progress: bool,
    world: World = SINGLE,
) -> dict[str, float]:
    """One pass over the training set; under DDP this rank's slice of every global batch.

    Each rank's loss is its examples' summed loss over the *global* batch size, times the
    world size: DDP averages gradients over ranks, so their average is the gradient of the
    global batch's mean loss even when the last batch does not split evenly.
    """
    from tqdm import tqdm

    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    generator = epoch_generator(cfg.seed, epoch)
    batches = distributed.global_batches(len(y), cfg.batch_size, world, generator)
    augment = cfg.augment and x.ndim == 4
    show = progress and world.is_main
    bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not show)
    for batch in bar:
        offsets = shift_offsets(len(batch), generator) if augment else None
        idx = distributed.shard(batch, world)
        inputs = apply_shift(x[idx], distributed.shard(offsets, world)) if augment else x[idx]
        logits = model(inputs)
        loss_sum = F.cross_entropy(
            logits, y[idx], reduction="sum", label_smoothing=cfg.label_smoothing
        )
        loss = loss_sum * (world.size / len(batch))
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {loss.item()} in epoch {epoch}; lower the learning rate "
                f"(now {cfg.lr:g}) or check the data for extreme values"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss_sum.item()
        correct += int((logits.argmax(1) == y[idx]).sum())
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    total_loss, correct, seen = distributed.all_reduce_sums([total_loss, correct, seen], world)
    return {"train_loss": total_loss / seen, "train_acc": correct / seen}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 512,
    world: World = SINGLE,
) -> dict:
    """Loss and accuracy with running statistics; refuses a model left in training mode.

    Under DDP each rank evaluates its slice of the data and the sums are added up, so every
    rank returns the whole set's figures. The model must be the same on every rank.
    """
    model.eval()
    require_eval_mode(model, "evaluate")
    x, y = distributed.shard(x, world), distributed.shard(y, world)
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    total_loss, correct, seen = distributed.all_reduce_sums([total_loss, correct, len(y)], world)
    return {"val_loss": total_loss / seen, "val_acc": correct / seen}


# --------------------------------------------------------------------------- the run


def tensors(split: Split) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.from_numpy(a) for a in (split.train_x, split.train_y, split.val_x, split.val_y)
    )


def rng_states() -> dict[str, Any]:
    """RNG states as plain data, so a `weights_only` load can restore them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train (or resume) one run into `run_dir`: checkpoint.pt, history.json, curves.png.

    An existing run is never overwritten by accident: without `resume` or `overwrite`, a
    checkpoint already in `run_dir` is an error. Resuming a finished run trains nothing.
    Under torchrun it joins the job's process group (or one the caller initialised) and
    trains data-parallel; only rank 0 reads and writes `run_dir`, and every rank returns.
    """
    with distributed.process_group() as world:
        return _train(cfg, Path(run_dir), world, resume, overwrite, progress, on_epoch)


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    world: World,
    resume: bool,
    overwrite: bool,
    progress: bool,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    distributed.main_computes(world, lambda: _check_run_dir(run_dir, resume, overwrite))
    seed_everything(cfg.seed, warn_only=world.device.type == "cuda")
    split = make_split(
        load_source(cfg.data, cfg.image_size, cfg.color_mode), cfg.val_fraction, cfg.seed
    )
    train_x, train_y, val_x, val_y = (t.to(world.device) for t in tensors(split))
    run = _Run.start(cfg, run_dir, split.info, world, len(train_y))

    history: list[dict[str, Any]] = []
    recalibration = None
    if resume:
        state = distributed.main_computes(world, lambda: load_checkpoint(run.checkpoint))
        history, recalibration = run.restore(state)
        if world.is_main:
            log.info("resuming %s after epoch %d of %d", run_dir, len(history), cfg.epochs)

    net = distributed.wrap(run.model, world, sync_bn=run.sync_bn)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        started = time.perf_counter()
        record = {"epoch": epoch, "lr": run.scheduler.get_last_lr()[0]}
        record |= train_epoch(
            net, run.optimizer, run.scheduler, train_x, train_y, cfg, epoch, progress, world
        )
        # Without SyncBN each rank has its own running statistics; rank 0's are saved, so
        # those are the ones to validate (with SyncBN this changes nothing).
        distributed.broadcast_buffers(run.model, world)
        record |= evaluate(run.model, val_x, val_y, world=world)
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if world.is_main:
            run.save(history)
            _log_epoch(record, cfg.epochs)
        if on_epoch:
            on_epoch(record)

    model = run.finish()  # a plain model again: no hooks, no synchronised BN, no DDP wrapper
    if world.is_main:
        plot_history(history, run_dir / PLOT_NAME, f"{cfg.model} on {split.info.source}")
    result = TrainResult(run_dir, model, history, split.info, recalibration, world)
    if cfg.bn_recalibrate and recalibration is None:
        batch = cfg.batch_size * world.size  # the global batch the weights were trained with
        result.recalibration = _recalibrate(model, train_x, val_x, val_y, batch, world)
        if world.is_main:
            run.save(history, result.recalibration)
    distributed.barrier(world)  # no rank returns before rank 0's files are complete
    return result


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if not resume and not overwrite and (run_dir / CHECKPOINT_NAME).exists():
        raise CheckpointError(
            f"{str(run_dir)!r} already holds a run; resume it (--resume), "
            "replace it (--overwrite) or choose another folder (--out)"
        )


def _log_epoch(record: dict[str, Any], epochs: int) -> None:
    log.info(
        "epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  (%.2fs)",
        record["epoch"], epochs, record["train_loss"], record["train_acc"],
        record["val_loss"], record["val_acc"], record["seconds"],
    )  # fmt: skip


def _recalibrate(
    model: nn.Module,
    train_x: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    bs: int,
    world: World = SINGLE,
) -> dict[str, float]:
    """Population statistics from one pass over the *whole* training set, on every rank.

    Every rank sees every batch, so the statistics come out identical everywhere without any
    communication, and an unsynchronised run's rank-0-only statistics are replaced by ones
    that saw all the data. The work is repeated per rank: one forward pass, no gradients.
    """
    before = evaluate(model, val_x, val_y, world=world)["val_acc"]
    batches = recalibrate_bn(model, train_x.split(bs))
    after = evaluate(model, val_x, val_y, world=world)["val_acc"]
    if world.is_main:
        log.info(
            "BN statistics recalibrated over %d training batches: val_acc %.4f → %.4f",
            batches, before, after,
        )  # fmt: skip
    return {"batches": batches, "val_acc_before": before, "val_acc_after": after}


@dataclass
class _Run:
    """One run's model and training state, and the only code that saves or restores it."""

    cfg: TrainConfig
    run_dir: Path
    info: DataInfo
    world: World
    model: nn.Module
    model_config: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    bn_stats: StatsHandle
    sync_bn: bool
    bn_types: distributed.BatchNormTypes

    @classmethod
    def start(cls, cfg: TrainConfig, run_dir: Path, info: DataInfo, world: World, n: int) -> _Run:
        """Model (on this rank's device, BN synchronised if asked), optimizer, schedule, policy."""
        model, model_config = build(cfg, info)
        model.to(world.device)
        policy = parse_bn_stats(cfg.bn_stats)
        sync_bn = world.is_distributed and cfg.sync_bn is not False
        bn_types: distributed.BatchNormTypes = {}
        if sync_bn:
            needs_stats = isinstance(policy, Window)  # only our SyncBN reports the global ones
            model, bn_types = distributed.to_sync_batchnorm(
                model, world, needs_batch_stats=needs_stats
            )
        generator = epoch_generator(cfg.seed, 1)
        steps = len(distributed.global_batches(n, cfg.batch_size, world, generator))
        optimizer, scheduler = make_optimizer(model, cfg, steps)
        # Before the first step, and before a resume restores the window's last batches.
        bn_stats = policy.attach(model)
        return cls(
            cfg, run_dir, info, world, model, model_config, optimizer, scheduler, bn_stats,
            sync_bn, bn_types,
        )  # fmt: skip

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def finish(self) -> nn.Module:
        """Detach the statistics policy and turn synchronised BNs back into the original ones."""
        self.bn_stats.remove()
        if self.sync_bn:
            self.model = distributed.to_plain_batchnorm(self.model, self.bn_types)
        return self.model

    def save(
        self, history: list[dict[str, Any]], recalibration: dict[str, float] | None = None
    ) -> None:
        """Checkpoint first (it is what resume needs), then the history beside it."""
        cfg = self.cfg
        layout = self.world.to_dict() | {"sync_bn": self.sync_bn}
        save_checkpoint(
            self.checkpoint,
            {
                "model": {"name": cfg.model, "config": self.model_config},
                "state_dict": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_states(),
                "bn_stats": self.bn_stats.state_dict(),
                "epoch": len(history),
                "train_config": cfg.to_dict(),
                "data_info": self.info.to_dict(),
                "history": history,
                "recalibration": recalibration,
                "distributed": layout,
            },
        )
        summary = {
            "model": cfg.model,
            "train_config": cfg.to_dict(),
            "distributed": layout,
            "epochs": history,
            "recalibration": recalibration,
        }
        atomic_write_text(self.run_dir / HISTORY_NAME, json.dumps(summary, indent=2) + "\n")

    def restore(
        self, state: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, float] | None]:
        """Load a checkpoint's state into this run, refusing a different config or world."""
        self._require_same_run(state)
        self.model.load_state_dict(distributed.strip_ddp_prefix(state["state_dict"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.bn_stats.load_state_dict(_to_device(state.get("bn_stats") or {}, self.world.device))
        restore_rng_states(state["rng"])
        return list(state["history"]), state.get("recalibration")

    def _require_same_run(self, state: dict[str, Any]) -> None:
        path, cfg = str(self.checkpoint), self.cfg
        saved = TrainConfig.from_dict(state["train_config"])
        if saved != cfg:
            changed = [
                f"{k} (checkpoint: {v!r}, now: {getattr(cfg, k)!r})"
                for k, v in saved.to_dict().items()
                if getattr(cfg, k) != v
            ]
            raise CheckpointError(
                f"cannot resume {path!r} with a different configuration: {'; '.join(changed)}"
            )
        size = (state.get("distributed") or {}).get("world_size", 1)
        if size != self.world.size:
            raise CheckpointError(
                f"cannot resume {path!r} on {self.world.size} process(es): it was trained on "
                f"{size}, and the global batch (batch size × processes) and the learning-rate "
                f"schedule would change; resume with --nproc {size}"
            )


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors in nested dicts and lists moved to `device` (checkpoints load onto the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def load_trained_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint's model in eval mode, and the checkpoint's contents (for export).

    The registry's model, with plain BatchNorm, whether the run was distributed or not: a
    checkpoint holds state, not modules. `module.` prefixes (a DDP wrapper's state dict saved
    by other code) are tolerated.
    """
    state = load_checkpoint(path)
    model = models.build_model(state["model"]["name"], state["model"]["config"])
    model.load_state_dict(distributed.strip_ddp_prefix(state["state_dict"]))
    return model.eval(), state


def validation_data(state: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A checkpoint's own validation split, normalised as in training; refuses changed data."""
    cfg = TrainConfig.from_dict(state["train_config"])
    info = DataInfo.from_dict(state["data_info"])
    data = load_source(cfg.data, cfg.image_size, cfg.color_mode)
    split = make_split(data, cfg.val_fraction, cfg.seed)
    if split.info.normalization != info.normalization or split.info.label_names != info.label_names:
        raise DataError(
            f"the data at {cfg.data!r} is not what the checkpoint was trained on (labels or "
            "normalisation differ), so its validation split cannot be rebuilt"
        )
    return split.val_x, split.val_y
