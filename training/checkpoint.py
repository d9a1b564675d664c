"""Checkpoints: one file per run, written atomically, loaded without unpickling code.

A checkpoint is `torch.save` of plain data only: tensors, numbers, strings, lists and dicts
(weights, optimizer and scheduler state, RNG states, configs, label names, normalisation,
history). Loading uses `torch.load(weights_only=True)`, whose unpickler refuses every global it
does not know, so a crafted file cannot run code; what it refuses surfaces as `CheckpointError`.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from training.atomic import atomic_write_bytes
from training.errors import CheckpointError

FORMAT = "foldserve.checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "state_dict", "epoch", "train_config", "data_info")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialise to memory first, then write atomically: the old checkpoint survives a crash."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint and check its shape; never executes code stored in the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            # torch warns about unusual pickle protocols before refusing them; the refusal,
            # not the warning, is what the user needs to see.
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors and plain "
            f"data, which could run code when unpickled ({first_line})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint: {exc}") from None
    return _validate(path, payload)


def _validate(path: Path, payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a foldserve checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format version {version}; this foldserve reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks {', '.join(missing)}")
    return payload
