"""The CPU budget from the affinity mask and the cgroup quota, driven by fake /proc and cgroup
files laid out as a container runtime lays them out."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cpu_budget import (
    CpuSources,
    cpu_budget,
    default_executor_size,
    threads_per_worker,
)

V2_MOUNT = "30 24 0:26 {root} {point} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNT = "31 24 0:27 {root} {point} rw,nosuid - cgroup cgroup rw,{options}\n"


def fake(
    tmp_path: Path,
    *,
    affinity: int,
    cgroup: str,
    mounts: list[str],
    files: dict[str, str],
) -> CpuSources:
    for relative, text in files.items():
        target = tmp_path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    (tmp_path / "proc_cgroup").write_text(cgroup)
    (tmp_path / "mountinfo").write_text("".join(mounts))
    return CpuSources(
        affinity=lambda: affinity,
        proc_cgroup=tmp_path / "proc_cgroup",
        mountinfo=tmp_path / "mountinfo",
    )


def v2(tmp_path: Path) -> str:
    """cgroup v2 mounted whole at <tmp>/cg2."""
    return V2_MOUNT.format(root="/", point=tmp_path / "cg2")


def test_v2_quota_rounds_up_and_caps_the_affinity(tmp_path):
    sources = fake(
        tmp_path,
        affinity=8,
        cgroup="0::/kubepods/pod1/ctr\n",
        mounts=[v2(tmp_path)],
        files={"cg2/kubepods/pod1/ctr/cpu.max": "150000 100000\n"},
    )
    budget = cpu_budget(sources)
    assert (budget.allowed, budget.affinity, budget.quota) == (2, 8, 1.5)
    assert budget.quota_file == str(tmp_path / "cg2/kubepods/pod1/ctr")
    assert "cgroup quota 1.5 CPU(s)" in budget.reason


def test_v2_max_means_no_quota_and_affinity_decides(tmp_path):
    sources = fake(
        tmp_path,
        affinity=3,
        cgroup="0::/a\n",
        mounts=[v2(tmp_path)],
        files={"cg2/a/cpu.max": "max 100000\n"},
    )
    budget = cpu_budget(sources)
    assert (budget.allowed, budget.quota) == (3, None)
    assert "no cgroup CPU quota" in budget.reason


def test_the_smallest_quota_along_the_ancestors_wins(tmp_path):
    sources = fake(
        tmp_path,
        affinity=16,
        cgroup="0::/outer/inner\n",
        mounts=[v2(tmp_path)],
        files={
            "cg2/cpu.max": "max 100000\n",
            "cg2/outer/cpu.max": "200000 100000\n",
            "cg2/outer/inner/cpu.max": "400000 100000\n",
        },
    )
    assert cpu_budget(sources).allowed == 2


def test_a_cgroup_namespace_mounts_our_own_cgroup_at_the_root(tmp_path):
    # Inside a container with a cgroup namespace /proc/self/cgroup says "0::/" and the mount is
    # the container's own cgroup.
    sources = fake(
        tmp_path,
        affinity=64,
        cgroup="0::/\n",
        mounts=[v2(tmp_path)],
        files={"cg2/cpu.max": "100000 100000\n"},
    )
    assert cpu_budget(sources).allowed == 1


def test_a_mount_of_a_sub_hierarchy_is_resolved_against_its_root(tmp_path):
    sources = fake(
        tmp_path,
        affinity=64,
        cgroup="0::/docker/abc\n",
        mounts=[V2_MOUNT.format(root="/docker/abc", point=tmp_path / "cg2")],
        files={"cg2/cpu.max": "300000 100000\n"},
    )
    assert cpu_budget(sources).allowed == 3


@pytest.mark.parametrize(
    ("quota", "allowed"), [("-1", 12), ("50000", 1), ("250000", 3)], ids=["none", "half", "2.5"]
)
def test_v1_cfs_quota_and_period(tmp_path, quota, allowed):
    sources = fake(
        tmp_path,
        affinity=12,
        cgroup="4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n",
        mounts=[
            V1_MOUNT.format(root="/", point=tmp_path / "cpu,cpuacct", options="cpu,cpuacct"),
            V1_MOUNT.format(root="/", point=tmp_path / "memory", options="memory"),
        ],
        files={
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": f"{quota}\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cpu_budget(sources).allowed == allowed


def test_affinity_below_the_quota_wins(tmp_path):
    sources = fake(
        tmp_path,
        affinity=1,
        cgroup="0::/a\n",
        mounts=[v2(tmp_path)],
        files={"cg2/a/cpu.max": "800000 100000\n"},
    )
    assert cpu_budget(sources).allowed == 1


@pytest.mark.parametrize(
    "files",
    [{}, {"cg2/a/cpu.max": "garbage\n"}, {"cg2/a/cpu.max": "0 100000\n"}],
    ids=["no-files", "garbage", "zero"],
)
def test_missing_or_odd_files_mean_no_quota(tmp_path, files):
    sources = fake(tmp_path, affinity=4, cgroup="0::/a\n", mounts=[v2(tmp_path)], files=files)
    assert cpu_budget(sources).allowed == 4


def test_no_cgroup_files_at_all(tmp_path):
    sources = CpuSources(
        affinity=lambda: 2, proc_cgroup=tmp_path / "none", mountinfo=tmp_path / "none"
    )
    assert cpu_budget(sources).allowed == 2


@pytest.mark.parametrize(
    ("allowed", "workers", "threads"), [(1, 1, 1), (8, 1, 8), (8, 3, 2), (2, 4, 1)]
)
def test_threads_are_shared_among_the_workers(tmp_path, allowed, workers, threads):
    sources = CpuSources(
        affinity=lambda: allowed, proc_cgroup=tmp_path / "x", mountinfo=tmp_path / "x"
    )
    budget = cpu_budget(sources)
    assert threads_per_worker(budget, workers) == threads
    assert default_executor_size(budget) == min(32, allowed + 4)


def test_this_machine_has_a_budget_within_its_cores():
    import os

    budget = cpu_budget()
    assert 1 <= budget.allowed <= (os.cpu_count() or 1)
