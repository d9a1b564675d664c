"""Data-parallel training under torchrun: the process group, the shards, the reductions, SyncBN.

One process per device, each holding a full replica (DistributedDataParallel averages the
gradients). What this module adds to PyTorch's pieces, and why:

- **The world** comes from torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
  `MASTER_ADDR`/`MASTER_PORT`): NCCL and `cuda:LOCAL_RANK` when CUDA is available, gloo on the
  CPU otherwise. Without that environment it is one process and nothing communicates.
- **Shards keep the single-process order.** Every rank draws the same per-(seed, epoch)
  permutation and cuts it into *global* batches of `batch_size × world` examples; rank r takes
  the r-th contiguous slice of each. Two processes with batch B therefore see, step for step,
  the batches one process with batch 2B sees — which is what makes synchronised BN testable
  against a single process, and a resumed run identical to an uninterrupted one.
- **Losses are scaled by the global batch**, so DDP's average of the ranks' gradients is the
  gradient of the global mean even when the last batch splits unevenly.
- **SyncBN**: training.bn.sync's on the CPU (nn.SyncBatchNorm refuses CPU tensors), and
  nn.SyncBatchNorm on GPUs unless a population-statistics policy needs the global batch's
  statistics (the window does; only ours reports them). Conversion back restores each BN's
  original class, so the model returned, saved and folded is the one the registry builds.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from training.bn.reference import rebuild_batchnorm, replace_batchnorms
from training.bn.sync import SyncBatchNorm
from training.errors import ConfigError, TrainingError

T = TypeVar("T")

# A dead or hung peer surfaces as an error in every collective after this long; torch's default
# is 30 minutes (10 for NCCL), long enough to hide a hang from whoever is watching the job.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
DDP_PREFIX = "module."


@dataclass(frozen=True)
class World:
    """This process's place in the job; `World()` is a single process on the CPU."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint records, so a resume can refuse a different world."""
        return {"world_size": self.size, "backend": self.backend}


SINGLE = World()


# --------------------------------------------------------------------------- the process group


def env_world_size() -> int:
    """WORLD_SIZE as torchrun (or any env:// launcher) sets it; 1 when launched plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def in_launched_worker() -> bool:
    """True inside a process started by torchrun (or a launcher that sets the same variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def choose_backend(local_rank: int) -> tuple[str, torch.device]:
    """NCCL with one GPU per process when CUDA is there, gloo on the CPU otherwise."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl", torch.device("cuda", local_rank % torch.cuda.device_count())
    return "gloo", torch.device("cpu")


def current_world() -> World:
    """The world of an already initialised process group (SINGLE when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # NCCL works on the GPU this process selected (process_group() selects cuda:LOCAL_RANK).
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    return World(
        dist.get_rank(), dist.get_world_size(), local_rank, backend, device or torch.device("cpu")
    )


@contextlib.contextmanager
def process_group(timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[World]:
    """Join the job torchrun started, or run alone; tears down only a group it created.

    A group the caller already initialised is used as it is (tests, notebooks, a launcher that
    trains twice). The group is destroyed only on a clean exit: after a failure the peers may
    be stuck in a collective, and the process is about to end anyway.
    """
    if dist.is_available() and dist.is_initialized():
        yield current_world()
        return
    if env_world_size() <= 1:
        yield SINGLE
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend, device = choose_backend(local_rank)
    if device.type == "cuda":
        # Deterministic cuBLAS needs this set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timeout)
    yield current_world()
    dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (on NCCL, on this rank's GPU, which NCCL cannot guess)."""
    if world.is_distributed:
        dist.barrier(device_ids=[world.device.index] if world.device.type == "cuda" else None)


# --------------------------------------------------------------------------- shards


def global_batches(n: int, per_rank: int, world: World, generator: torch.Generator) -> list[Tensor]:
    """This epoch's global batches (indices into the training set), the same on every rank.

    A seeded permutation cut into batches of `per_rank × world`. A short last batch is kept
    when every rank still gets two examples: BatchNorm in training mode refuses one.
    """
    size = per_rank * world.size
    batches = list(torch.randperm(n, generator=generator).split(size))
    if len(batches) > 1 and len(batches[-1]) < 2 * world.size:
        batches.pop()
    if len(batches[0]) < 2 * world.size:
        raise ConfigError(
            f"{n} training examples cannot give each of {world.size} processes two examples "
            "per batch; use fewer processes or more data"
        )
    return batches


def shard(t: Tensor, world: World) -> Tensor:
    """This rank's contiguous slice of `t` (sizes differ by at most one between ranks)."""
    if not world.is_distributed:
        return t
    return torch.tensor_split(t, world.size)[world.rank]


# --------------------------------------------------------------------------- reductions


def all_reduce_sums(values: Sequence[float], world: World) -> list[float]:
    """Sum numbers over every rank (in float64, so counts and losses stay exact enough)."""
    if not world.is_distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_buffers(model: nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BN running statistics): the ones that get saved."""
    if world.is_distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def main_computes(world: World, compute: Callable[[], T]) -> T:
    """Run `compute` on rank 0 only and hand its result, or its TrainingError, to every rank.

    For what only rank 0 may look at (the run folder on its file system): every rank then
    goes on, or fails with the same message, instead of some waiting forever on the others.
    """
    result: T | None = None
    error: TrainingError | None = None
    if world.is_main:
        try:
            result = compute()
        except TrainingError as exc:
            error = exc
    if world.is_distributed:
        box: list[Any] = [result, error]
        dist.broadcast_object_list(box, src=0, device=world.device)
        result, error = box
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


# --------------------------------------------------------------------------- models


def wrap(model: nn.Module, world: World, *, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel around `model`, or `model` itself when running alone.

    With synchronised BN the running statistics are already equal everywhere, so DDP's
    per-step broadcast of rank 0's buffers (`forward_sync_buffers`) would be wasted; without
    it that broadcast is what makes every rank start each step from rank 0's statistics.
    """
    if not world.is_distributed:
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=not sync_bn)


def strip_ddp_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict saved from a DDP wrapper, with its `module.` prefixes removed.

    Training saves the wrapped model's own state dict, which has none; this is for loading
    checkpoints whose state dict came from the wrapper (other code, older scripts).
    """
    if state_dict and all(key.startswith(DDP_PREFIX) for key in state_dict):
        return {key.removeprefix(DDP_PREFIX): value for key, value in state_dict.items()}
    return state_dict


BatchNormTypes = dict[str, type[_BatchNorm]]


def to_sync_batchnorm(
    model: nn.Module, world: World, *, needs_batch_stats: bool = False
) -> tuple[nn.Module, BatchNormTypes]:
    """Make every BN synchronised, in place; returns the root and each BN's original class.

    Parameters and buffers are shared, not copied: convert before building the optimizer or
    after, either way it updates the same tensors. `needs_batch_stats` asks for our SyncBN on
    GPUs too, because only it reports the global batch's statistics to a policy (the window).
    """
    originals = {name: type(m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if world.device.type == "cuda" and not needs_batch_stats:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), originals

    def to_ours(bn: _BatchNorm) -> nn.Module | None:
        return None if isinstance(bn, SyncBatchNorm) else rebuild_batchnorm(bn, SyncBatchNorm)

    return replace_batchnorms(model, to_ours), originals


def to_plain_batchnorm(model: nn.Module, originals: BatchNormTypes) -> nn.Module:
    """Undo `to_sync_batchnorm`, in place: each BN back to its original class, sharing tensors.

    Folding and export would accept a synchronised BN (it subclasses `_BatchNorm` and is plain
    BN in eval mode), but the model a run returns should be the one the registry builds, with
    no process group attached.
    """
    names = {id(m): name for name, m in model.named_modules()}

    def back(bn: _BatchNorm) -> nn.Module | None:
        original = originals.get(names.get(id(bn), ""))
        if original is None or type(bn) is original:
            return None
        return rebuild_batchnorm(bn, original)

    return replace_batchnorms(model, back)


# --------------------------------------------------------------------------- launching


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """`foldserve <argv>` again, as `nproc` processes on this machine under torchrun.

    `--standalone` runs the rendezvous on a free local port, so two jobs on one machine do
    not collide. `--nproc` is left out of the re-invoked command: torchrun's own parser reads
    it as an ambiguous abbreviation of its `--nproc-per-node` and refuses to start.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "foldserve",
        *without_option(argv, "--nproc"),
    ]


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` less `option VALUE` and `option=VALUE`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out
