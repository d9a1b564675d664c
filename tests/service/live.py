"""A real service process on 127.0.0.1, started the way `foldserve serve` starts it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT


@dataclass
class LiveServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(
    repository: Path, ready_timeout: float = 60.0, wait_ready: bool = True, **settings: str
) -> Iterator[LiveServer]:
    """Run `python -m service.main` with FOLDSERVE_* variables; stop it afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDSERVE_")}
    env.update(
        FOLDSERVE_REPOSITORY=str(repository),
        FOLDSERVE_PORT=str(port),
        FOLDSERVE_INTRA_OP_THREADS="1",
        FOLDSERVE_INTER_OP_THREADS="1",
        FOLDSERVE_SHUTDOWN_GRACE_S="0",  # tests stop servers at once; tests/deploy covers the drain
    )
    env.update({f"FOLDSERVE_{k.upper()}": v for k, v in settings.items()})
    log = repository.parent / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.main"], cwd=REPO_ROOT, env=env, stdout=sink, stderr=sink
        )
    live = LiveServer(f"http://127.0.0.1:{port}", port, process, log)
    try:
        _wait(live, "/v2/health/ready" if wait_ready else "/v2/health/live", ready_timeout)
        yield live
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait(live: LiveServer, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live.process.poll() is not None:
            raise RuntimeError(f"server exited with {live.process.returncode}:\n{live.logs()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(live.url + path, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server not up on {path} after {timeout} s:\n{live.logs()}")
