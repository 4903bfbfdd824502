"""Prometheus text exposition."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import StateDep

router = APIRouter(tags=["ops"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(state: StateDep) -> Response:
    registry = state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
