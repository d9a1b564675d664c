"""The service process itself: no torch, start-up logs, settings errors, access log, docs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT
from tests.service.live import LiveServer


def test_service_process_never_imports_torch(server: LiveServer) -> None:
    """torch's import maps libtorch into the process; the service's must hold none of it."""
    httpx.get(server.url + "/v2/models/digits")  # every route module is imported by now
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "torch" not in maps
    assert "onnxruntime" in maps  # the check would see a library if one were there


def test_startup_logs_each_model_version_and_provider(server: LiveServer) -> None:
    logs = server.logs()
    assert "model digits version 1 ready: providers CPUExecutionProvider" in logs
    assert "repository " in logs


def test_access_log_line_carries_the_request_id(server: LiveServer) -> None:
    response = httpx.get(server.url + "/v2/health/live", headers={"X-Request-ID": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    generated = httpx.get(server.url + "/v2/health/live").headers["x-request-id"]
    following = httpx.get(server.url + "/v2/health/live").headers["x-request-id"]
    assert len(generated) == 32 and generated != following
    lines = [line for line in server.logs().splitlines() if '"request_id": "req-42"' in line]
    record = json.loads(lines[-1].split("service.access: ", 1)[1])
    assert record["status"] == 200 and record["path"] == "/v2/health/live"


def test_invalid_setting_fails_at_start_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "FOLDSERVE_REPOSITORY": str(tmp_path), "FOLDSERVE_PORT": "99999"}
    done = subprocess.run(
        [sys.executable, "-m", "service.main"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "FOLDSERVE_PORT" in done.stderr and "65535" in done.stderr


def test_docs_page_works_offline(server: LiveServer) -> None:
    page = httpx.get(server.url + "/docs").text
    assert "SwaggerUIBundle" in page and "/openapi.json" in page
    assert "cdn" not in page.lower() and "://" not in page.replace(server.url, "")
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert asset in page
        response = httpx.get(server.url + asset)
        assert response.status_code == 200 and len(response.content) > 10_000


def test_openapi_declares_the_infer_body(server: LiveServer) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()
    body = schema["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/InferenceRequest"
    assert "inputs" in schema["components"]["schemas"]["InferenceRequest"]["properties"]


def test_metrics_use_tritons_names(server: LiveServer) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
    httpx.post(server.url + "/v2/models/affine/infer", json=body)
    httpx.post(server.url + "/v2/models/affine/infer", json={"inputs": []})
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "nv_inference_request_success",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_pending_request_count",
    ):
        assert f"# TYPE {name} " in text
        assert f'{name}{{model="affine",version="1"}} ' in text
    assert 'nv_inference_request_failure{model="affine",version="1",reason="OTHER"} ' in text
    assert "foldserve_inference_request_duration_seconds_bucket" in text
