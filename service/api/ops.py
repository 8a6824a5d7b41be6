"""Operations routes: Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service import routes
from service.api.errors import ERROR_RESPONSES
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["Operations"], responses=ERROR_RESPONSES)


@router.get(routes.METRICS, response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}})
async def metrics(request: Request) -> Response:
    """Every bertserve_* series (requests, latency, queue, batches, models) plus process metrics."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
