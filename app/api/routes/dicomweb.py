"""DICOMweb: STOW-RS in (PS3.18 10.5), our SR and SC objects out (WADO-RS), JSON findings.

Instances of one request are analysed as one study per StudyInstanceUID. Status codes: 200 all
stored, 202 some failed, 409 none stored (every instance conflicted: study UID mismatch,
unsupported SOP class or modality, undecodable), 400 bad multipart syntax, 415 wrong media type.
FailureReason per instance: 0xA900 study UID mismatch, 0x0122 SOP class (or modality) not
supported, 0xC000 cannot understand (not DICOM, undecodable pixels), 0xA700 out of resources
(over the pixel limit). Results are stored for retrieval here and pushed to the configured
DICOMweb destination (see app/results/store.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from app.api.deps import StateDep, request_id_of
from app.api.schemas import Delivery, Findings, StowJson, errors
from app.core.errors import ApiError
from app.dicom.multipart import (
    MultipartError,
    RelatedParser,
    TooManyPartsError,
    build_related,
    media_params,
)
from app.pacs.ingest import (
    CANNOT_UNDERSTAND,
    Accepted,
    Refused,
    analyse_instances,
    read_instance,
)
from app.results.store import StudyResult
from app.state import AppState
from app.study import resolve_models

log = logging.getLogger("app.dicomweb")
router = APIRouter(tags=["dicomweb"])

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"

STOW_DOC = {
    "requestBody": {
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"}
            }
        },
        "required": True,
    },
    "responses": {
        "200": {"content": {"application/dicom+json": {}, "application/json": {}}},
        "202": {
            "description": "some instances stored, some failed (FailedSOPSequence)",
            "content": {"application/dicom+json": {}},
        },
        "409": {
            "description": "no instance stored (FailedSOPSequence says why)",
            "content": {"application/dicom+json": {}},
        },
    },
}


def _sop_item(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


async def _store(
    request: Request,
    state: AppState,
    url_study: str | None,
    fp_per_image: float | None,
    score_threshold: float | None,
) -> Response:
    media, params = media_params(request.headers.get("content-type", ""))
    if (
        media != "multipart/related"
        or params.get("type", "application/dicom").lower() != "application/dicom"
    ):
        raise ApiError(
            415,
            "unsupported_media_type",
            'STOW-RS takes multipart/related; type="application/dicom"',
        )
    crp, clf, det, point = resolve_models(state, None, None, fp_per_image, score_threshold)
    limit = state.settings.max_images_per_request
    try:  # parsed as it streams in: memory is the parts, not copies of the body
        parser = RelatedParser(params.get("boundary", ""), limit)
        async for chunk in request.stream():
            parser.feed(chunk)
        parts = parser.finish()
    except TooManyPartsError:
        raise ApiError(
            413, "too_many_images", f"more than {limit} instances; the limit is {limit}"
        ) from None
    except MultipartError as exc:
        raise ApiError(400, "invalid_multipart", str(exc)) from None
    if not parts:
        raise ApiError(400, "no_instances", "the request carries no DICOM instance")

    async with state.admission.admit():  # 503 with Retry-After when the queue is full
        failed: list[Dataset] = []
        studies: OrderedDict[str, list[Accepted]] = OrderedDict()
        for part in parts:
            ptype = media_params(part.content_type)[0] if part.content_type else "application/dicom"
            outcome: Accepted | Refused
            if ptype != "application/dicom":
                outcome = Refused("", "", CANNOT_UNDERSTAND)
            else:
                outcome = await run_in_threadpool(read_instance, part.body, state, url_study)
            if isinstance(outcome, Accepted):
                studies.setdefault(outcome.image.study_instance_uid or "", []).append(outcome)
            else:
                item = _sop_item(outcome.sop_class, outcome.sop_uid)
                item.FailureReason = outcome.reason
                failed.append(item)
                state.metrics.images.labels("rejected").inc()

        request_id = request_id_of(request)
        # Never the caller's Host header: it would be stored in the findings and shown to others.
        base = (state.settings.public_url or "").rstrip("/")
        answers = await analyse_instances(state, studies, point, (crp, clf, det), request_id, base)
    referenced = [
        _sop_item(str(a.header.SOPClassUID), str(a.header.SOPInstanceUID))
        for accepted in studies.values()
        for a in accepted
    ]
    status = 200 if not failed else (202 if referenced else 409)
    log.info(
        "request %s: STOW-RS %d instance(s), %d failed, %d study(ies) analysed",
        request_id,
        len(parts),
        len(failed),
        len(studies),
    )

    if "application/json" in request.headers.get(
        "accept", ""
    ) and "dicom+json" not in request.headers.get("accept", ""):
        body = StowJson(request_id=request_id, studies=answers, failed=len(failed))
        return _json(body.model_dump(mode="json"), status)
    response = Dataset()
    if url_study or len(studies) == 1:
        response.RetrieveURL = f"{base}/dicomweb/studies/{url_study or next(iter(studies))}"
    if failed:
        response.FailedSOPSequence = failed
    if referenced:
        response.ReferencedSOPSequence = referenced
    headers = (
        {"Link": ", ".join(f'<{a.results_url}/findings>; rel="describedby"' for a in answers)}
        if answers
        else {}
    )
    return _json(response.to_json_dict(), status, "application/dicom+json", headers)


def _json(
    content: Any, status: int, media: str = "application/json", headers: dict | None = None
) -> Response:
    import json

    return Response(json.dumps(content), status_code=status, media_type=media, headers=headers)


@router.post(
    "/dicomweb/studies",
    summary="STOW-RS: store (analyse) instances",
    openapi_extra=STOW_DOC,
    responses=errors(400, 413, 415, 422, 503),
)
async def store_instances(
    request: Request,
    state: StateDep,
    fp_per_image: float | None = Query(
        None, description="operating point (0.1 to 0.5, default 0.4)"
    ),
    score_threshold: float | None = Query(
        None, description="detector threshold; overrides fp_per_image"
    ),
) -> Response:
    return await _store(request, state, None, fp_per_image, score_threshold)


@router.post(
    "/dicomweb/studies/{study_uid}",
    summary="STOW-RS: store (analyse) instances of one study",
    openapi_extra=STOW_DOC,
    responses=errors(400, 413, 415, 422, 503),
)
async def store_study_instances(
    request: Request,
    state: StateDep,
    study_uid: str = Path(..., pattern=UID_PATTERN, max_length=64),
    fp_per_image: float | None = Query(None),
    score_threshold: float | None = Query(None),
) -> Response:
    return await _store(request, state, study_uid, fp_per_image, score_threshold)


async def _result_or_404(state: AppState, study_uid: str) -> StudyResult:
    result = await asyncio.to_thread(state.results.get, study_uid)
    if result is None:
        raise ApiError(
            404,
            "unknown_study",
            "no results for this study here (never analysed, or past retention)",
        )
    return result


@router.get(
    "/dicomweb/studies/{study_uid}",
    summary="WADO-RS: our result objects (SR, SC) of a study",
    response_class=Response,
    responses={
        200: {
            "description": "our SR and secondary captures, Part 10 instances",
            "content": {'multipart/related; type="application/dicom"': {}},
        },
        **errors(404, 422),
    },
)
async def retrieve_results(
    state: StateDep, study_uid: str = Path(..., pattern=UID_PATTERN, max_length=64)
) -> Response:
    result = await _result_or_404(state, study_uid)
    body, ctype = build_related(result.instances)
    return Response(body, media_type=ctype.split(";")[0], headers={"content-type": ctype})


@router.get(
    "/dicomweb/studies/{study_uid}/findings",
    summary="our JSON findings of a study, and their delivery",
    response_model=Findings,
    responses=errors(404, 422),
)
async def study_findings(
    state: StateDep, study_uid: str = Path(..., pattern=UID_PATTERN, max_length=64)
) -> Findings:
    result = await _result_or_404(state, study_uid)
    return Findings(
        **result.findings.model_dump(),
        delivery=Delivery(
            destination_configured=state.deliverer is not None,
            delivered=result.delivered,
            attempts=result.attempts,
            last_error=result.last_error,
            given_up=result.given_up,
        ),
    )
