"""docker-compose.yml and its CPU override, as `docker-compose config` reads them.

Compose cannot run containers here, but its own parser validates the files (Debian's
docker-compose package: Compose v1.29, whose schema the v2 files here also satisfy) with and
without the override and under every profile, and the merged result is checked for what the
deployment relies on.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from tests.conftest import REPO_ROOT

COMPOSE = shutil.which("docker-compose")
pytestmark = pytest.mark.skipif(
    COMPOSE is None,
    reason="docker-compose is not installed (Debian: apt-get install docker-compose)",
)
BASE = ("docker-compose.yml",)
CPU = ("docker-compose.yml", "docker-compose.cpu.yml")
PROFILES = ("trainer", "monitoring", "scale")


@functools.cache  # one `docker-compose config` per combination: each takes about a second
def config(files: tuple[str, ...], profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    command = [COMPOSE or "docker-compose"]
    for file in files:
        command += ["-f", file]
    for profile in profiles:
        command += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    done = subprocess.run(
        [*command, "config"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def _combinations() -> list[tuple[str, ...]]:
    return [c for n in range(len(PROFILES) + 1) for c in itertools.combinations(PROFILES, n)]


@pytest.mark.parametrize("profiles", _combinations(), ids=lambda p: "+".join(p) or "default")
@pytest.mark.parametrize("files", [BASE, CPU], ids=["gpu", "cpu-override"])
def test_config_validates(files: tuple[str, ...], profiles: tuple[str, ...]) -> None:
    services = config(files, profiles)["services"]
    assert {"api", "trainer", "prometheus", "grafana", "lb"} <= set(services)


def test_api_reserves_a_gpu_and_has_port_volume_healthcheck_restart() -> None:
    api = config(BASE)["services"]["api"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert api["image"] == "foldserve:gpu" and api["build"]["target"] == "gpu"
    assert [p["target"] for p in api["ports"]] == [8000]
    assert "models:/models:rw" in api["volumes"]
    assert api["healthcheck"]["test"][-1] == "/usr/local/lib/foldserve/healthcheck.py"
    assert api["restart"] == "unless-stopped"
    assert "profiles" not in api


def test_stop_waits_longer_than_the_drain() -> None:
    for name, service in config(CPU)["services"].items():
        if name.startswith("api"):
            env = service["environment"]
            grace = float(env["FOLDSERVE_SHUTDOWN_GRACE_S"])
            timeout = float(env.get("FOLDSERVE_SHUTDOWN_TIMEOUT_S", default_shutdown_timeout()))
            assert _seconds(service["stop_grace_period"]) > grace + timeout


def default_shutdown_timeout() -> float:
    return Settings.model_fields["shutdown_timeout_s"].default


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


def test_cpu_override_swaps_in_api_cpu_without_a_reservation() -> None:
    services = config(CPU)["services"]
    assert services["api"]["profiles"] == ["gpu"]  # the GPU api is off unless asked for
    cpu = services["api-cpu"]
    assert "deploy" not in cpu and "profiles" not in cpu
    assert cpu["image"] == "foldserve:cpu" and cpu["build"]["target"] == "cpu"
    assert cpu["networks"]["default"]["aliases"] == ["api"]  # found as `api` by everyone


def test_api_cpu_is_api_but_for_image_and_gpu() -> None:
    services = config(CPU)["services"]
    differ = {"image", "build", "deploy", "networks", "profiles"}
    gpu = {k: v for k, v in services["api"].items() if k not in differ}
    cpu = {k: v for k, v in services["api-cpu"].items() if k not in differ}
    assert cpu == gpu


def test_profiles_hold_the_optional_services() -> None:
    services = config(BASE)["services"]
    assert services["trainer"]["profiles"] == ["trainer"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert services["lb"]["profiles"] == ["scale"]


def test_trainer_shares_the_models_volume_and_runs_the_job_the_image_installs() -> None:
    trainer = config(BASE)["services"]["trainer"]
    assert "models:/models:rw" in trainer["volumes"]
    assert trainer["build"]["target"] == "train"
    assert trainer["command"] == ["foldserve-train-job"]
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "/usr/local/bin/foldserve-train-job" in dockerfile
    assert trainer["environment"]["FOLDSERVE_API"] == "http://api:8000"


def test_every_bind_mounted_file_exists() -> None:
    for name, service in config(CPU, PROFILES)["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts missing {source}"


def test_prometheus_scrapes_every_api_replica() -> None:
    prometheus = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"] == [
        {"names": ["api"], "type": "A", "port": 8000, "refresh_interval": "10s"}
    ]


def test_nginx_balances_the_api_and_retries_a_draining_replica() -> None:
    conf = (REPO_ROOT / "deploy/nginx/nginx.conf").read_text()
    assert "server api:8000 resolve" in conf
    assert re.search(r"proxy_next_upstream [^;]*http_503[^;]*non_idempotent;", conf)
    assert "listen 8080;" in conf
