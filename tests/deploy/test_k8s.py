"""deploy/k8s: the Kubernetes manifests against Kubernetes' own schemas (offline, with
kubernetes-validate), the KServe ones against the schema of their required fields kept beside
them, and both against what the image and the service expect.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"
KSERVE = K8S / "kserve"
IMAGE_UID = 10001


def _documents(folder: Path, recursive: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    files = sorted(folder.rglob("*.yaml") if recursive else folder.glob("*.yaml"))
    return [(f, doc) for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def _kubernetes() -> list[tuple[Path, dict[str, Any]]]:
    return [(f, d) for f, d in _documents(K8S) if KSERVE not in f.parents]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _kubernetes() if d["kind"] == kind]


@pytest.mark.parametrize(
    ("path", "doc"), _kubernetes(), ids=[str(f.relative_to(K8S)) for f, _ in _kubernetes()]
)
def test_manifest_validates_against_kubernetes_schemas(path: Path, doc: dict[str, Any]) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install it)"
    )
    kv.validate(doc, kv.latest_version(), strict=True)  # raises with the failing path


def test_every_kind_the_issue_asks_for_is_there() -> None:
    kinds = {d["kind"] for _, d in _kubernetes()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    names = {d["metadata"]["name"] for d in _by_kind("Deployment")}
    assert names == {"foldserve-cpu", "foldserve-gpu"}


@pytest.mark.parametrize("deployment", _by_kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_deployment_probes_drain_and_user(deployment: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    env = {e["name"]: e["value"] for e in container["env"]}
    grace = float(env["FOLDSERVE_SHUTDOWN_GRACE_S"])
    # The kubelet's SIGKILL comes after the drain and the requests in flight.
    assert pod["terminationGracePeriodSeconds"] >= grace + 30
    # Readiness fails within the grace period, so the pod leaves the Service while it drains.
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] < grace
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = _by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()


def test_gpu_variant_requests_a_gpu_and_runs_the_gpu_image() -> None:
    (gpu,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "foldserve-gpu"]
    (container,) = gpu["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":gpu")


def test_autoscalers_target_the_deployments() -> None:
    deployments = {d["metadata"]["name"] for d in _by_kind("Deployment")}
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in _by_kind("HorizontalPodAutoscaler")}
    assert targets == deployments


def test_image_user_matches_the_dockerfile() -> None:
    assert f"--uid {IMAGE_UID}" in (REPO_ROOT / "Dockerfile").read_text()


# --------------------------------------------------------------------------- KServe


@pytest.fixture(scope="module")
def validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    schema = json.loads((KSERVE / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _kserve() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for _, d in _documents(KSERVE)}


def test_kserve_manifests_match_the_schema(validator: Any) -> None:
    docs = _kserve()
    assert set(docs) == {"ServingRuntime", "InferenceService"}
    for doc in docs.values():
        validator.validate(doc)


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("ServingRuntime", ["spec", "containers"]),
        ("ServingRuntime", ["spec", "protocolVersions"]),
        ("InferenceService", ["spec", "predictor", "model", "modelFormat"]),
        ("InferenceService", ["spec", "predictor", "model", "storageUri"]),
        ("InferenceService", ["metadata", "name"]),
    ],
)
def test_kserve_schema_rejects_a_missing_required_field(
    validator: Any, kind: str, path: list[str]
) -> None:
    doc = copy.deepcopy(_kserve()[kind])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    assert not validator.is_valid(doc)


def test_inference_service_runs_on_the_foldserve_runtime() -> None:
    docs = _kserve()
    runtime, service = docs["ServingRuntime"], docs["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {
        f["name"] for f in runtime["spec"]["supportedModelFormats"]
    }
    (container,) = runtime["spec"]["containers"]
    args = " ".join(container["args"])
    port = container["ports"][0]["containerPort"]
    assert f"--port={port}" in args and "--repository=/mnt/models" in args  # KServe's model dir
    assert re.search(r"--models=\{\{\.Name\}\}", args)  # the InferenceService's name
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
