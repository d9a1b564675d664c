"""`/metrics` for Prometheus, under Triton's metric names (rendered by `service/metrics.py`).

Open like the health endpoints, and left out of the OpenAPI document: it is for scrapers.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.deps import ServicesDep
from service.metrics import CONTENT_TYPE

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
