"""schemathesis against the service's own OpenAPI schema: no generated request gets a 5xx.

Every operation is exercised with a bounded number of generated cases against a live server
(127.0.0.1 only); the only check is the one the issue asks for, `not_a_server_error`.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from tests.service.live import LiveServer

EXAMPLES_PER_OPERATION = 25


@pytest.mark.slow
def test_no_generated_request_gets_a_5xx(server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 19  # every endpoint, with and without versions
    for operation in operations:
        _exercise(operation, server.url, pin=None)
        if "{name}" in operation.path and "/repository/" not in operation.path:
            _exercise(operation, server.url, pin={"name": "digits", "version": "1"})
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


def _exercise(
    operation: schemathesis.APIOperation, base_url: str, pin: dict[str, str] | None
) -> None:
    """Generated cases; with `pin`, aimed at a real model so bodies reach its validation."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy())
    def run(case: schemathesis.Case) -> None:
        if pin:
            case.path_parameters = {k: pin[k] for k in case.path_parameters or {}}
        case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=30)

    run()
