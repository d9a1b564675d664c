"""How many CPUs this process may really use, and the thread counts that follow from it.

`os.cpu_count()` is the host's cores. A container with a CPU limit (Kubernetes `limits.cpu`,
`docker run --cpus`), a process pinned with `taskset`, or one of several `FOLDSERVE_WORKERS`
processes may use far fewer, and a thread pool sized from the host then spins against the event
loop on the few CPUs it has: ONNX Runtime's default intra-op pool, pinned to one core, served
digits at ~2,100 req/s where one thread served ~5,900 (bench/README.md). So the budget is

    allowed = min(CPUs in the affinity mask, ceil(cgroup quota / period))

with the quota read as the smallest along the process's cgroup and its ancestors (cgroup v2
`cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`; `max` or -1 means none). Every file is
read through `CpuSources`, so tests drive the decision with fake files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CpuSources:
    """Where the facts come from; the defaults are this machine's."""

    affinity: Callable[[], int] = field(default=lambda: len(os.sched_getaffinity(0)))
    proc_cgroup: Path = Path("/proc/self/cgroup")
    mountinfo: Path = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use, with the figures the decision came from."""

    allowed: int
    affinity: int
    quota: float | None  # CPUs the cgroup quota grants; None when there is no quota
    quota_file: str | None  # the file that set the quota

    @property
    def reason(self) -> str:
        """One line for the start-up log and the model config."""
        parts = [f"{self.affinity} CPU(s) in the affinity mask"]
        parts.append(
            f"cgroup quota {self.quota:g} CPU(s) ({self.quota_file})"
            if self.quota is not None
            else "no cgroup CPU quota"
        )
        return f"{self.allowed} CPU(s) available: " + ", ".join(parts)


def cpu_budget(sources: CpuSources | None = None) -> CpuBudget:
    """The CPU budget of this process (never less than 1)."""
    sources = sources or CpuSources()
    affinity = max(1, _affinity(sources))
    quota, where = _cgroup_quota(sources)
    allowed = affinity if quota is None else max(1, min(affinity, math.ceil(quota)))
    return CpuBudget(allowed=allowed, affinity=affinity, quota=quota, quota_file=where)


def threads_per_worker(budget: CpuBudget, workers: int) -> int:
    """ONNX Runtime intra-op threads for one of `workers` processes sharing the budget."""
    return max(1, budget.allowed // max(1, workers))


def default_executor_size(budget: CpuBudget) -> int:
    """Python's own formula for the default executor, min(32, CPUs + 4), on our CPU count."""
    return min(32, budget.allowed + 4)


# --------------------------------------------------------------------------- reading the files


def _affinity(sources: CpuSources) -> int:
    try:
        return sources.affinity()
    except (AttributeError, OSError):  # no sched_getaffinity on this platform
        return os.cpu_count() or 1


def _cgroup_quota(sources: CpuSources) -> tuple[float | None, str | None]:
    """The smallest quota along the cgroup path, in CPUs, and the file that set it."""
    best: tuple[float | None, str | None] = (None, None)
    for directory, reader in _cgroup_dirs(sources):
        for folder in _up_to_mount(directory):
            quota = reader(folder)
            if quota is not None and (best[0] is None or quota < best[0]):
                best = (quota, str(folder))
    return best


def _cgroup_dirs(sources: CpuSources) -> Iterator[tuple[tuple[Path, Path], Callable]]:
    """(cgroup folder, its mount point) with the reader for that hierarchy's quota files."""
    memberships = _memberships(sources.proc_cgroup)
    for mount_root, mount_point, fstype, options in _cgroup_mounts(sources.mountinfo):
        if fstype == "cgroup2" and "" in memberships:
            yield (_resolve(mount_point, mount_root, memberships[""]), mount_point), _v2_quota
        elif fstype == "cgroup" and "cpu" in options.split(","):
            path = next((p for c, p in memberships.items() if "cpu" in c.split(",")), None)
            if path is not None:
                yield (_resolve(mount_point, mount_root, path), mount_point), _v1_quota


def _memberships(proc_cgroup: Path) -> dict[str, str]:
    """/proc/self/cgroup as {controllers: path}; cgroup v2's line has no controllers ("")."""
    found: dict[str, str] = {}
    for line in _read(proc_cgroup).splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            found[parts[1]] = parts[2]
    return found


def _cgroup_mounts(mountinfo: Path) -> Iterator[tuple[str, Path, str, str]]:
    """(root inside the hierarchy, mount point, fstype, super options) of each cgroup mount."""
    for line in _read(mountinfo).splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            yield fields[3], Path(fields[4]), tail[0], tail[2]


def _resolve(mount_point: Path, mount_root: str, path: str) -> Path:
    """The folder of cgroup `path` under a mount of the hierarchy from `mount_root`."""
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root) :]
    elif mount_root != "/":
        return mount_point  # a cgroup namespace: the mount is our own cgroup
    return mount_point / path.lstrip("/")


def _up_to_mount(located: tuple[Path, Path]) -> Iterator[Path]:
    folder, mount_point = located
    while True:
        yield folder
        if folder == mount_point or mount_point not in folder.parents:
            return
        folder = folder.parent


def _v2_quota(folder: Path) -> float | None:
    words = _read(folder / "cpu.max").split()
    if len(words) != 2 or words[0] == "max":
        return None
    return _ratio(words[0], words[1])


def _v1_quota(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    return _ratio(quota.strip(), period.strip()) if quota.strip() not in ("", "-1") else None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
