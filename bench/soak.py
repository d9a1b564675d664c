"""Soak: sustained mixed load for a bounded time, with nothing lost and nothing growing.

    .venv/bin/python bench/soak.py                 # 10 minutes
    .venv/bin/python bench/soak.py --minutes 1     # a quick look

Not a test: a real `python -m service.main` on 127.0.0.1 serving two small models with known
answers (affine: y = 2x + 1; spare: y = 3x + 1), and `--clients` threads sending, at random,
valid JSON requests, valid binary requests, and invalid ones (malformed JSON, wrong shapes,
truncated binary data). Every `--churn-s` seconds the spare model is unloaded and loaded again.
It checks:

  * zero 5xx, and no broken connection;
  * every 200 carries the right answer; every invalid request a 4xx with {"error": ...};
  * requests to the spare model are answered, or refused with 503 while it is unloaded;
  * the server's RSS and open file descriptors, sampled each second from /proc, are flat after
    the warm-up (the first fifth of the run): it reports their growth from the end of the
    warm-up to the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.overload import free_port, service_process  # noqa: E402
from tests.service import onnx_models as om  # noqa: E402

HEADER = "Inference-Header-Content-Length"
SCALES = {"affine": 2.0, "spare": 3.0}


def json_request(rng: random.Random) -> tuple[bytes, dict[str, str], np.ndarray]:
    x = np.array([[rng.randint(-50, 50) / 4 for _ in range(4)] for _ in range(rng.randint(1, 4))])
    body = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    return json.dumps(body).encode(), {}, x.astype(np.float32)


def binary_request(rng: random.Random) -> tuple[bytes, dict[str, str], np.ndarray]:
    x = np.array([[rng.randint(-50, 50) / 4 for _ in range(4)] for _ in range(rng.randint(1, 4))])
    x = x.astype(np.float32)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + x.tobytes(), {HEADER: str(len(head))}, x


INVALID = [
    (b'{"inputs": [', {}),
    (b'{"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1,2,3,4,5]}]}', {}),
    (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a",2,3,4]}]}', {}),
    (
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32",'
        b'"parameters":{"binary_data_size":16}}]}' + b"\0" * 7,
        {HEADER: "77"},
    ),
    (b"\xff\xfe\x00garbage", {}),
]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []

    def add(self, key: str, problem: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if problem and len(self.problems) < 20:
                self.problems.append(problem)


def check_answer(response: httpx.Response, x: np.ndarray, scale: float) -> bool:
    if HEADER.lower() in response.headers:
        length = int(response.headers[HEADER])
        y = np.frombuffer(response.content[length:], np.float32).reshape(x.shape)
    else:
        y = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(x.shape)
    return bool(np.array_equal(y, scale * x + 1))


def client(url: str, seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            model = "spare" if rng.random() < 0.2 else "affine"
            kind = rng.choice(["json", "binary", "invalid"])
            try:
                if kind == "invalid":
                    body, headers = rng.choice(INVALID)
                    response = http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
                    good = 400 <= response.status_code < 500 and "error" in response.json()
                    if model == "spare" and response.status_code == 503:
                        tally.add("spare_unloaded_503")
                        continue
                    tally.add(
                        "invalid_4xx" if good else "invalid_wrong",
                        None if good else response.text[:200],
                    )
                    continue
                body, headers, x = (json_request if kind == "json" else binary_request)(rng)
                response = http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            except httpx.HTTPError as exc:
                tally.add("transport_error", repr(exc))
                continue
            if response.status_code == 503 and model == "spare":
                tally.add("spare_unloaded_503")
            elif response.status_code >= 500:
                tally.add("5xx", f"{response.status_code} {response.text[:200]}")
            elif response.status_code != 200:
                tally.add("valid_refused", f"{response.status_code} {response.text[:200]}")
            elif check_answer(response, x, SCALES[model]):
                tally.add(f"{kind}_ok")
            else:
                tally.add("wrong_answer", f"{kind} {model}")


def churn(url: str, every: float, stop: threading.Event, tally: Tally) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.wait(every):
            unload = http.post("/v2/repository/models/spare/unload")
            stop.wait(every / 4)
            load = http.post("/v2/repository/models/spare/load")
            ok = unload.status_code == 200 and load.status_code == 200
            tally.add("churn_ok" if ok else "churn_failed", None if ok else load.text[:200])


def sample(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of the server process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--churn-s", type=float, default=20.0, help="unload/load period")
    args = parser.parse_args()
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    repo = work / "repo"
    for name, scale in SCALES.items():
        om.publish(repo, name, 1, om.affine_model(scale=scale))
    tally = Tally()
    samples: list[tuple[float, float, int]] = []
    stop = threading.Event()
    seconds = args.minutes * 60
    with service_process(port, repo, work / "server.log", {}) as process:
        url = f"http://127.0.0.1:{port}"
        threads = [
            threading.Thread(target=client, args=(url, seed, stop, tally))
            for seed in range(args.clients)
        ]
        threads.append(threading.Thread(target=churn, args=(url, args.churn_s, stop, tally)))
        for thread in threads:
            thread.start()
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            rss, fds = sample(process.pid)
            samples.append((time.monotonic() - start, rss, fds))
            time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    warm = next(s for s in samples if s[0] >= seconds / 5)
    end = samples[-1]
    bad = sum(
        tally.counts[k]
        for k in (
            "5xx",
            "wrong_answer",
            "transport_error",
            "invalid_wrong",
            "valid_refused",
            "churn_failed",
        )
    )
    report = {
        "date": datetime.date.today().isoformat(),
        "minutes": args.minutes,
        "counts": dict(sorted(tally.counts.items())),
        "requests_per_s": round(sum(tally.counts.values()) / seconds, 1),
        "rss_mib": {
            "after_warmup": round(warm[1], 1),
            "end": round(end[1], 1),
            "growth": round(end[1] - warm[1], 1),
            "max": round(max(s[1] for s in samples), 1),
        },
        "open_fds": {
            "after_warmup": warm[2],
            "end": end[2],
            "growth": end[2] - warm[2],
            "max": max(s[2] for s in samples),
        },
        "problems": tally.problems,
        "passed": bad == 0,
    }
    print(json.dumps(report, indent=2))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
