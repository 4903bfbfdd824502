"""Liveness and readiness, with KServe-style aliases."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import StateDep
from app.api.errors import error_response
from app.api.schemas import Live, Ready, errors

router = APIRouter(tags=["health"])


@router.api_route("/healthz", methods=["GET", "HEAD"], summary="alive", response_model=Live)
@router.api_route(
    "/v2/health/live", methods=["GET", "HEAD"], summary="alive (KServe path)", response_model=Live
)
async def live() -> Live:
    return Live(status="alive")


@router.api_route(
    "/readyz",
    methods=["GET", "HEAD"],
    summary="models loaded, sha256 checked, warm-up passed",
    response_model=Ready,
    responses=errors(503),
)
@router.api_route(
    "/v2/health/ready",
    methods=["GET", "HEAD"],
    summary="ready (KServe path)",
    response_model=Ready,
    responses=errors(503),
)
async def ready(state: StateDep) -> Ready | JSONResponse:
    if not state.ready:
        return error_response(503, "not_ready", state.not_ready_reason)
    return Ready(
        status="ready", models={m.name: m.provider for m in state.registry.models.values()}
    )
