"""Several server processes (service.main, service.worker_metrics): settings reach every worker,
and /metrics adds all of them up whichever worker answers the scrape.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from service.main import metrics_directory, settings_environment
from service.settings import ENV_PREFIX, Settings, load_settings
from service.worker_metrics import ENV as METRICS_DIR_ENV
from tests.service import onnx_models as om
from tests.service.live import start_server

DIGIT = [[[0, 0, 7, 15, 13, 1, 0, 0]] * 8]  # one 1×8×8 image; the label does not matter here


def test_settings_round_trip_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(ENV_PREFIX + name.upper(), raising=False)
    settings = load_settings(
        {
            "repository": str(tmp_path),
            "models": "digits,affine",
            "providers": "cpu",
            "api_token": "s3cret",
            "workers": "3",
            "shutdown_grace_s": "1.5",
            "access_log": False,
            "port": "0",
        }
    )
    for key, value in settings_environment(settings).items():
        monkeypatch.setenv(key, value)
    assert load_settings() == settings
    assert load_settings().token() == "s3cret"


def test_a_given_metrics_directory_is_cleared_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "keep.txt").write_text("not ours")
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    with metrics_directory() as path:
        assert path == tmp_path
        assert not list(tmp_path.glob("*.db"))
    assert (tmp_path / "keep.txt").exists()


def test_a_temporary_metrics_directory_is_made_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(METRICS_DIR_ENV, raising=False)
    with metrics_directory() as path:
        assert path.is_dir()
        assert os.environ[METRICS_DIR_ENV] == str(path)
    assert not path.exists()
    assert METRICS_DIR_ENV not in os.environ


def _successes_per_worker(folder: Path) -> dict[str, float]:
    """nv_inference_request_success of the digits model, from each worker's own file."""
    counts = {}
    for file in folder.glob("gauge_sum_*.db"):
        pid = re.sub(r"\D", "", file.stem)
        metrics = MultiProcessCollector.merge([str(file)], accumulate=False)
        counts[pid] = sum(
            s.value
            for m in metrics
            if m.name == "nv_inference_request_success"
            for s in m.samples
            if s.labels.get("model") == "digits"
        )
    return counts


def _scraped(url: str, pattern: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


@pytest.mark.slow
def test_metrics_add_up_every_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    om.publish(repo, "digits", 1, om.DIGITS)
    shared = tmp_path / "prometheus"
    monkeypatch.setenv(METRICS_DIR_ENV, str(shared))
    with start_server(repo, workers="2", shutdown_grace_s="0") as live:
        sent = 0
        for _ in range(30):  # until both workers have served some: connections land anywhere
            for _ in range(10):
                # A new connection each time, so the kernel may hand it to either worker.
                with httpx.Client() as client:
                    response = client.post(f"{live.url}/v2/models/digits/classify", json=DIGIT)
                assert response.status_code == 200, response.text
                sent += 1
            time.sleep(1.2)  # workers write their counts once a second
            if sum(1 for n in _successes_per_worker(shared).values() if n > 0) >= 2:
                break
        per_worker = _successes_per_worker(shared)
        assert sum(1 for n in per_worker.values() if n > 0) >= 2, per_worker
        assert sum(per_worker.values()) == sent
        for _ in range(4):  # whichever worker answers, the totals are everyone's
            success = r'^nv_inference_request_success\{model="digits",version="1"\} (\S+)$'
            assert _scraped(live.url, success) == sent
            histogram = (
                r"^foldserve_inference_request_duration_seconds_count"
                r'\{model="digits",version="1"\} (\S+)$'
            )
            assert _scraped(live.url, histogram) == sent
