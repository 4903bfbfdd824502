"""Typed dependencies the routes take as parameters (one place that knows where things live)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.core.logs import new_request_id
from app.service import FractureService


def get_service(request: Request) -> FractureService:
    return request.app.state.fracture


ServiceDep = Annotated[FractureService, Depends(get_service)]


def request_id_of(request: Request) -> str:
    """This request's id (set by the middleware from X-Request-ID, echoed in the answer)."""
    return request.scope.get("state", {}).get("request_id") or new_request_id(
        request.headers.get("x-request-id")
    )
