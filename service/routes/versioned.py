"""One endpoint at two paths: `/v2/models/{name}...` and `/v2/models/{name}/versions/{version}...`.

Every per-model endpoint of the protocol exists both ways; without a version the highest serving
one answers (Triton's choice). The endpoint takes `name: str, version: str | None = None`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

MODEL = "/v2/models/{name}"
VERSION = MODEL + "/versions/{version}"


def with_and_without_version(
    register: Callable[..., Callable[[Endpoint], Endpoint]],
    suffix: str,
    *,
    summary: tuple[str, str],
    operation_id: tuple[str, str],
    **options: Any,
) -> Callable[[Endpoint], Endpoint]:
    """A decorator that registers the endpoint with `register` (a router's `get` or `post`) at
    `MODEL + suffix` and `VERSION + suffix`, with the same `options` at both; `summary` and
    `operation_id` give the model's path first, then the version's."""

    def decorate(endpoint: Endpoint) -> Endpoint:
        # The version's path first, as the two stacked decorators this replaces registered them.
        versioned = register(
            VERSION + suffix, summary=summary[1], operation_id=operation_id[1], **options
        )
        plain = register(
            MODEL + suffix, summary=summary[0], operation_id=operation_id[0], **options
        )
        return plain(versioned(endpoint))

    return decorate
