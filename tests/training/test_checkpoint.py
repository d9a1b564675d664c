"""Checkpoints load plain data only: a crafted pickle is refused and its code never runs."""

from __future__ import annotations

import pickle

import pytest
import torch

from training.checkpoint import load_checkpoint, save_checkpoint
from training.errors import CheckpointError

MINIMAL = {
    "model": {"name": "mlp", "config": {}},
    "state_dict": {"w": torch.ones(2)},
    "epoch": 1,
    "train_config": {},
    "data_info": {},
}


class Exploit:
    """Unpickling this calls exec, which would create `marker`: what an attacker would ship."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"with open({self.marker!r}, 'w') as f: f.write('pwned')",))


def test_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, MINIMAL)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert loaded["format_version"] == 1


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {**MINIMAL, "format": "foldserve.checkpoint", "format_version": 1}
    payload["extra"] = Exploit(marker)
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=r"refusing to load .* could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_the_exploit_is_real(tmp_path):
    """Guard the guard: plain pickle would have run the payload."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Exploit(marker)))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable checkpoint"),
        (b"PK\x03\x04 truncated zip", "not a readable checkpoint"),
    ],
)
def test_garbage_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_foreign_and_incomplete_files_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a foldserve checkpoint"):
        load_checkpoint(path)
    torch.save({"format": "foldserve.checkpoint", "format_version": 1}, path)
    with pytest.raises(CheckpointError, match="lacks model, state_dict"):
        load_checkpoint(path)
    torch.save({"format": "foldserve.checkpoint", "format_version": 99}, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, MINIMAL)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint(path, {**MINIMAL, "bad": lambda: None})
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
