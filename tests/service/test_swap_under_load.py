"""A new version loads beside the serving one under load: no request fails, versions switch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.service import onnx_models as om
from tests.service.live import start_server

BODY = {
    "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]
}
CLIENTS = 4
MAX_SECONDS = 20.0
MAX_REQUESTS = 4000  # per client


def _hammer(url: str, stop: threading.Event, seen: list[str], failures: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(MAX_REQUESTS):
            if stop.is_set():
                return
            try:
                response = http.post("/v2/models/digits/infer", json=BODY)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text}")
            else:
                seen.append(response.json()["model_version"])


def test_new_version_swaps_in_without_a_failed_request(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    om.publish(root, "digits", 1, om.DIGITS)
    with start_server(root, models="digits") as live:
        stop = threading.Event()
        seen: list[list[str]] = [[] for _ in range(CLIENTS)]
        failures: list[str] = []
        threads = [
            threading.Thread(target=_hammer, args=(live.url, stop, seen[i], failures))
            for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + MAX_SECONDS
        try:
            while sum(map(len, seen)) < 100 and time.monotonic() < deadline:
                time.sleep(0.05)
            om.publish(root, "digits", 2, om.DIGITS)
            load = httpx.post(live.url + "/v2/repository/models/digits/load", timeout=60)
            assert load.status_code == 200, load.text
            assert load.json()["versions"] == ["2"]
            mark = [len(s) for s in seen]
            while (
                min(len(s) - m for s, m in zip(seen, mark, strict=True)) < 50
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert failures == []
        for versions in seen:
            assert versions[0] == "1" and versions[-1] == "2"
            switch = versions.index("2")
            assert set(versions[switch:]) == {"2"}  # once switched, never back
        index = httpx.post(live.url + "/v2/repository/index").json()
        states = {(m["name"], m["version"]): m["state"] for m in index}
        assert states == {("digits", "1"): "UNAVAILABLE", ("digits", "2"): "READY"}
        assert "model digits version 2 ready" in live.logs()
