"""What routes depend on, as `Annotated` aliases: the app's services and the token check.

Everything hangs off `app.state.services`, built once by `create_app(settings)`; nothing is a
module-level singleton, so two apps with different settings live side by side in one test.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import UnauthorizedError
from service.executor import Executor
from service.manager import ModelManager
from service.metrics import Metrics
from service.protocol import Limits
from service.runtime import RuntimeOptions
from service.settings import Settings
from service.stats import StatsBook


@dataclass(frozen=True)
class Services:
    settings: Settings
    options: RuntimeOptions
    manager: ModelManager
    executor: Executor
    stats: StatsBook
    metrics: Metrics
    limits: Limits = field(default_factory=Limits)  # per request, from the settings


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]

_bearer = HTTPBearer(
    auto_error=False,
    description="Needed for infer, classify, repository control and stats when the server "
    "has a token (FOLDSERVE_API_TOKEN)",
)


def require_token(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the server has no token or the request carries `Bearer <token>`."""
    check_bearer(services.settings.token(), credentials.credentials if credentials else None)


def check_authorization(token: str | None, header: str | None) -> None:
    """`require_token` by hand from the raw header, for routes outside FastAPI's dependency
    injection (the infer hot path); the header is read as `HTTPBearer` reads it."""
    if token is None:
        return
    scheme, _, credentials = (header or "").partition(" ")
    credentials = credentials.strip()
    check_bearer(token, credentials if scheme.lower() == "bearer" and credentials else None)


def check_bearer(token: str | None, credentials: str | None) -> None:
    if token is None:
        return
    if credentials is None:
        raise UnauthorizedError("missing 'Authorization: Bearer <token>' header")
    if not hmac.compare_digest(credentials.encode(), token.encode()):
        raise UnauthorizedError("wrong token in the Authorization header")


Authorized = [Depends(require_token)]
