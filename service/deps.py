"""What routes depend on, as `Annotated` aliases: the app's services and the token check.

Everything hangs off `app.state.services`, built once by `create_app(settings)`; nothing is a
module-level singleton, so two apps with different settings live side by side in one test.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import UnauthorizedError
from service.inference import Executor
from service.manager import ModelManager
from service.metrics import Metrics
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
    token = services.settings.token()
    if token is None:
        return
    if credentials is None:
        raise UnauthorizedError("missing 'Authorization: Bearer <token>' header")
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise UnauthorizedError("wrong token in the Authorization header")


Authorized = [Depends(require_token)]
