"""Writing into the model repository: `models/<name>/<version>/model.onnx`, Triton's layout.

A version folder appears whole or not at all: its files are written into a temporary folder
beside the versions (`.tmp-…`, a name no loader takes for a version), fsynced, and the folder is
renamed into place. A process killed mid-export leaves only a `.tmp-…` folder behind, which the
next export clears away once it is an hour old.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from foldserve.repository_layout import MODEL_FILE, NAME_RULE, valid_name
from training.atomic import FILE_MODE, TEMP_PREFIX, fsync_dir
from training.errors import ExportError


def check_name(name: str) -> str:
    """Model names become folder names: no separators, no dot-dot, nothing hidden."""
    if not valid_name(name):
        raise ExportError(f"invalid model name {name!r}: {NAME_RULE}")
    return name


def versions(repository: Path, name: str) -> list[int]:
    """Published versions of a model, ascending; temporary and foreign folders are ignored."""
    folder = repository / check_name(name)
    if not folder.is_dir():
        return []
    found = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(v for v in found if v > 0 and (folder / str(v) / MODEL_FILE).is_file())


def next_version(repository: Path, name: str) -> int:
    folder = repository / check_name(name)
    taken = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(taken, default=0) + 1


def publish(repository: Path, name: str, version: int, files: dict[str, bytes]) -> Path:
    """Write `files` as version `version` of `name`, atomically; refuses an existing version."""
    if version < 1:
        raise ExportError(f"versions are positive integers, not {version}")
    folder = repository / check_name(name)
    final = folder / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists; versions are never overwritten")
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(folder)
    staging = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{version}-", dir=folder))
    try:
        for filename, data in files.items():
            _write_synced(staging / filename, data)
        staging.chmod(0o755)
        fsync_dir(staging)
        os.rename(staging, final)  # atomic on one file system; fails if `final` appeared
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(folder)
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fchmod(handle.fileno(), FILE_MODE)
        os.fsync(handle.fileno())


def _clear_stale_temporaries(folder: Path, older_than_s: float = 3600.0) -> None:
    """Remove staging folders that killed exports left behind (never loaded, only clutter).

    Only old ones: a young one may belong to an export running right now in another process.
    """
    now = time.time()
    for stale in folder.glob(TEMP_PREFIX + "*"):
        if stale.is_dir() and now - stale.stat().st_mtime > older_than_s:
            shutil.rmtree(stale, ignore_errors=True)
