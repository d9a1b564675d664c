"""The Grafana dashboard and its provisioning: every Triton-named metric on a panel, every
panel on the provisioned Prometheus data source, the dashboard where provisioning looks.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from service.metrics import render_triton
from service.stats import StatsBook
from tests.conftest import REPO_ROOT

GRAFANA = REPO_ROOT / "deploy" / "grafana"
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_pending_request_count",
}


def _dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "foldserve.json").read_text())


def _expressions() -> str:
    return "\n".join(t["expr"] for p in _dashboard()["panels"] for t in p["targets"])


def test_every_triton_metric_is_charted() -> None:
    missing = {m for m in TRITON_METRICS if m not in _expressions()}
    assert not missing


def test_the_charted_metrics_are_the_ones_the_service_exports() -> None:
    stats = StatsBook()
    stats.of("digits", 1)
    exported = render_triton(stats)
    for metric in TRITON_METRICS:
        assert f"# TYPE {metric} " in exported


def test_panels_for_rate_latency_percentiles_batch_size_and_queue_time() -> None:
    titles = {p["title"] for p in _dashboard()["panels"]}
    assert {"Request rate", "Latency percentiles", "Batch size", "Queue time per request"} <= titles
    assert "histogram_quantile(0.99" in _expressions()


def test_panels_use_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert source["url"] == "http://prometheus:9090"
    for panel in _dashboard()["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"]


def test_dashboard_provider_points_where_compose_mounts_the_dashboards() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/foldserve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose
