from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import SettingsError
from service.runtime import resolve_providers
from service.settings import cli_options, load_settings


def test_environment_then_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FOLDSERVE_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("FOLDSERVE_PROVIDERS", "cuda, cpu")
    monkeypatch.setenv("FOLDSERVE_MODELS", "a,b")
    settings = load_settings({"port": 9000, "host": None})
    assert settings.repository == tmp_path and settings.port == 9000
    assert settings.host == "127.0.0.1"  # None means "not given on the command line"
    assert settings.providers == ("cuda", "cpu") and settings.models == ("a", "b")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"port": 70000}, "FOLDSERVE_PORT"),
        ({"repository": "/no/such/folder"}, "is not a folder"),
        ({"log_level": "loud"}, "FOLDSERVE_LOG_LEVEL"),
        ({"max_body_bytes": 0}, "FOLDSERVE_MAX_BODY_BYTES"),
        ({"bogus": 1}, "bogus"),
        ({"cuda_conv_algo_search": "FAST"}, "FOLDSERVE_CUDA_CONV_ALGO_SEARCH"),
        ({"cuda_arena_extend_strategy": "grow"}, "FOLDSERVE_CUDA_ARENA_EXTEND_STRATEGY"),
        ({"cuda_mem_limit_mib": -1}, "FOLDSERVE_CUDA_MEM_LIMIT_MIB"),
        ({"tensorrt_cache_dir": "/no/such/cache"}, "is not a folder"),
        ({"body_timeout_s": 0}, "FOLDSERVE_BODY_TIMEOUT_S"),
    ],
)
def test_invalid_settings_are_one_line(tmp_path: Path, overrides: dict, fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment) as err:
        load_settings({"repository": str(tmp_path), **overrides})
    assert "\n" not in str(err.value)


def test_providers_resolve() -> None:
    assert resolve_providers(["auto"], ["CPUExecutionProvider"]) == ("CPUExecutionProvider",)
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["auto"], both) == tuple(both)
    assert resolve_providers(["cpu"], both) == ("CPUExecutionProvider",)
    with pytest.raises(SettingsError, match="CUDAExecutionProvider not offered"):
        resolve_providers(["cuda"], ["CPUExecutionProvider"])


def test_cli_options_mirror_the_fields() -> None:
    flags = {o.flag: o for o in cli_options()}
    assert {"--repository", "--providers", "--api-token", "--max-body-bytes", "--port"} <= set(
        flags
    )
    assert flags["--providers"].default == "auto" and flags["--port"].help
