"""Typed dependencies the routes take as parameters (one place that knows where things live)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from app.core.logs import new_request_id
from app.service import FractureService


def get_service(request: Request) -> FractureService:
    return request.app.state.fracture


ServiceDep = Annotated[FractureService, Depends(get_service)]


# The operating point a request may ask for, with the bounds the schema states (one place for the
# three routes that take it). Within them, the detector card's own table decides (0.1 to 0.5 for
# the shipped detectors; outside it: 422 invalid_operating_point).
FpPerImage = Annotated[
    float | None,
    Query(
        gt=0,
        le=1,
        description="operating point in false positives per image; the detector card's table "
        "covers 0.1 to 0.5 (default 0.4)",
    ),
]
ScoreThreshold = Annotated[
    float | None,
    Query(ge=0, le=1, description="detector score threshold; overrides fp_per_image"),
]


def request_id_of(request: Request) -> str:
    """This request's id (set by the middleware from X-Request-ID, echoed in the answer)."""
    return request.scope.get("state", {}).get("request_id") or new_request_id(
        request.headers.get("x-request-id")
    )
