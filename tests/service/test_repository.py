from __future__ import annotations

from pathlib import Path

import pytest

from service import repository
from service.errors import BadRequestError, ModelConfigError
from service.repository import VersionPolicy


@pytest.mark.parametrize("name", ["..", "a/b", ".hidden", "", "a" * 129, "a..b", "x\x00"])
def test_bad_names(name: str) -> None:
    with pytest.raises(BadRequestError, match="invalid model name"):
        repository.check_name(name)


@pytest.mark.parametrize("text", ["0", "-1", "1.0", "v1", "", "١", "99999999999999999999"])
def test_bad_versions(text: str) -> None:
    with pytest.raises(BadRequestError, match="invalid model version"):
        repository.parse_version(text)


def test_symlink_out_of_the_repository_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "repo", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    with pytest.raises(BadRequestError, match="outside the repository"):
        repository.model_folder(root, "escape")


def test_versions_on_disk_ignore_foreign_folders(tmp_path: Path) -> None:
    for folder in ("1", "3", "0", ".tmp-2-x", "notes"):
        (tmp_path / "m" / folder).mkdir(parents=True)
        (tmp_path / "m" / folder / "model.onnx").write_bytes(b"")
    (tmp_path / "m" / "5").mkdir()  # no model.onnx: not a version
    assert repository.versions_on_disk(tmp_path, "m") == [1, 3]


@pytest.mark.parametrize(
    ("policy", "selected"),
    [
        ({}, [5]),
        ({"latest": {"num_versions": 2}}, [3, 5]),
        ({"all": {}}, [1, 3, 5]),
        ({"specific": {"versions": [1, 4]}}, [1]),
    ],
)
def test_version_policies(policy: dict, selected: list[int]) -> None:
    assert VersionPolicy.model_validate(policy).select([1, 3, 5]) == selected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{", "not valid JSON"),
        ('{"version_policy": {"all": {}, "latest": {}}}', "one version policy"),
        ('{"max_batch_size": -1}', "max_batch_size"),
        ('{"preprocessing": {"std": [0]}}', "positive"),
        ('{"surprise": 1}', "surprise"),
    ],
)
def test_config_errors_name_the_field(text: str, fragment: str) -> None:
    with pytest.raises(ModelConfigError, match=fragment):
        repository.parse_config(text)


def test_config_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"preprocessing": {"ink": "low"}}')
    assert repository.read_config(tmp_path, "m").preprocessing.ink == "low"
    assert repository.read_config(tmp_path, "m").version_policy.select([1, 2]) == [2]
