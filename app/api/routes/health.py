"""Liveness and readiness, with KServe-style aliases."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.core.errors import error_response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="alive")
@router.get("/v2/health/live", summary="alive (KServe path)")
async def live() -> dict:
    return {"status": "alive"}


@router.get("/readyz", summary="models loaded, sha256 checked, warm-up passed")
@router.get("/v2/health/ready", summary="ready (KServe path)")
async def ready(request: Request) -> JSONResponse:
    state = request.app.state.fracture
    if not state.ready:
        return error_response(503, "not_ready", state.not_ready_reason)
    models = {m.name: m.provider for m in state.registry.models.values()}
    return JSONResponse({"status": "ready", "models": models})
