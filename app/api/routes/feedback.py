"""Readers' feedback: POST a reading of an analysed image, list readings, export the site
manifest that `python -m training adapt --folder` reads (app/results/feedback.py)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.api.deps import ServiceDep
from app.api.schemas import errors
from app.core.logs import caller
from app.results.feedback import FeedbackStore, Reading, StoredFeedback, manifest_csv
from app.service import FractureService

router = APIRouter(tags=["feedback"])
audit = logging.getLogger("app.audit")


class FeedbackList(BaseModel):
    feedback: list[StoredFeedback]


def _store(service: FractureService) -> FeedbackStore:
    assert service.feedback is not None  # built with the service in create_app
    return service.feedback


def _call(reading: Reading) -> str:
    if reading.agree is not None:
        return "agree" if reading.agree else "disagree"
    return "doubt_resolved" if reading.fractured is not None else "boxes_only"


@router.post(
    "/v1/feedback",
    summary="a reader's judgement of one analysed image",
    status_code=201,
    response_model=StoredFeedback,
    responses=errors(401, 422),
)
async def add_feedback(reading: Reading, service: ServiceDep) -> StoredFeedback:
    stored = await run_in_threadpool(_store(service).add, reading, caller.get())
    service.metrics.feedback.labels(reading.models.classifier.name, _call(reading)).inc()
    audit.info(
        "feedback %s on request %s image %d: %s",
        stored.feedback_id,
        reading.request_id,
        reading.image_index,
        _call(reading),
    )
    return stored


@router.get(
    "/v1/feedback",
    summary="readers' judgements, oldest first",
    response_model=FeedbackList,
    responses=errors(401, 422),
)
async def list_feedback(
    service: ServiceDep,
    request_id: str | None = Query(None, max_length=64, description="one answer's readings"),
    since: float | None = Query(None, ge=0, description="seconds since the epoch"),
    limit: int = Query(1000, ge=1, le=10000),
) -> FeedbackList:
    rows = await run_in_threadpool(_store(service).list, request_id, since, limit)
    return FeedbackList(feedback=rows)


@router.get(
    "/v1/feedback/manifest.csv",
    summary="the site manifest for `python -m training adapt` (each image's latest reading)",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}, **errors(401)},
)
async def feedback_manifest(service: ServiceDep) -> Response:
    rows = await run_in_threadpool(_store(service).latest_per_image)
    return Response(
        manifest_csv(rows),
        media_type="text/csv",
        headers={
            "Content-Disposition": 'attachment; filename="manifest.csv"',
            "Cache-Control": "no-store",
        },
    )
