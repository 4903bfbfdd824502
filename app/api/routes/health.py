"""Liveness and readiness, with KServe-style aliases; GET and HEAD on each path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import ServiceDep
from app.api.errors import error_response
from app.api.schemas import Live, Ready, errors

router = APIRouter(tags=["health"])


async def live() -> Live:
    return Live(status="alive")


async def ready(service: ServiceDep) -> Ready | JSONResponse:
    if not service.ready:
        return error_response(503, "not_ready", service.not_ready_reason)
    return Ready(
        status="ready", models={m.name: m.provider for m in service.registry.models.values()}
    )


def _probe(path: str, endpoint: Callable[..., Any], summary: str, **documented: Any) -> None:
    """GET and HEAD on a path, each its own operation (one operation id per method)."""
    name = path.strip("/").replace("/", "_")
    for method in ("GET", "HEAD"):
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            summary=summary,
            operation_id=f"{method.lower()}_{name}",
            **documented,
        )


_probe("/healthz", live, "alive", response_model=Live)
_probe("/v2/health/live", live, "alive (KServe path)", response_model=Live)
READY = "models loaded, sha256 checked, warm-up passed"
_probe("/readyz", ready, READY, response_model=Ready, responses=errors(503))
_probe(
    "/v2/health/ready", ready, f"{READY} (KServe path)", response_model=Ready, responses=errors(503)
)
