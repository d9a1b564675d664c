"""The model repository: validated names, next versions, folders that appear whole or not at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training import repository
from training.errors import ExportError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "x" * 129, "a..b", "sp ace"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ExportError, match="invalid model name"):
        repository.check_name(name)


def test_versions_count_only_complete_numbered_folders(tmp_path):
    assert repository.next_version(tmp_path, "m") == 1
    repository.publish(tmp_path, "m", 1, {"model.onnx": b"one"})
    repository.publish(tmp_path, "m", 3, {"model.onnx": b"three"})
    (tmp_path / "m" / "7").mkdir()  # no model file: not a version, but its number is taken
    (tmp_path / "m" / ".tmp-9-abc").mkdir()
    assert repository.versions(tmp_path, "m") == [1, 3]
    assert repository.next_version(tmp_path, "m") == 8
    assert (tmp_path / "m" / "3" / "model.onnx").read_bytes() == b"three"
    assert oct((tmp_path / "m" / "3" / "model.onnx").stat().st_mode & 0o777) == "0o644"


def test_a_version_is_never_overwritten(tmp_path):
    repository.publish(tmp_path, "m", 1, {"model.onnx": b"one"})
    with pytest.raises(ExportError, match="never overwritten"):
        repository.publish(tmp_path, "m", 1, {"model.onnx": b"other"})
    assert (tmp_path / "m" / "1" / "model.onnx").read_bytes() == b"one"
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]


def test_stale_staging_folders_are_cleared_but_young_ones_kept(tmp_path):
    old, young = tmp_path / "m" / ".tmp-1-old", tmp_path / "m" / ".tmp-1-young"
    old.mkdir(parents=True)
    young.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    repository.publish(tmp_path, "m", 1, {"model.onnx": b"x"})
    assert not old.exists()
    assert young.exists()


WRITER = """
import sys
from pathlib import Path
from training import repository
repository.publish(Path(sys.argv[1]), "big", 1, {"model.onnx": b"\\0" * 400_000_000})
"""


def test_killing_a_publish_mid_write_leaves_no_version(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 60
    staged = None
    while time.monotonic() < deadline and proc.poll() is None:
        staged = (
            next((tmp_path / "big").glob(".tmp-*/model.onnx"), None)
            if (tmp_path / "big").exists()
            else None
        )
        if staged is not None:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the write finished before the kill"
    assert staged is not None
    assert repository.versions(tmp_path, "big") == []
    assert not (tmp_path / "big" / "1").exists()
