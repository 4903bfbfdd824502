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
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from app.api.deps import FpPerImage, ScoreThreshold, ServiceDep, request_id_of
from app.api.schemas import Delivery, Findings, StowFailure, StowJson, errors
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
from app.service import FractureService

log = logging.getLogger("app.dicomweb")
router = APIRouter(tags=["dicomweb"])

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


def _dicom_json_attribute(vr: str, description: str, value: dict) -> dict:
    return {
        "type": "object",
        "description": description,
        "properties": {"vr": {"const": vr}, "Value": {"type": "array", "items": value}},
    }


# PS3.18 store response in DICOM JSON (PS3.18 F.2): what STOW-RS answers, typed for clients.
_SOP_ITEM = {
    "type": "object",
    "properties": {
        "00081150": _dicom_json_attribute("UI", "ReferencedSOPClassUID", {"type": "string"}),
        "00081155": _dicom_json_attribute("UI", "ReferencedSOPInstanceUID", {"type": "string"}),
        "00081197": _dicom_json_attribute(
            "US",
            "FailureReason: 0xA900 UID missing or not the study's, 0x0122 SOP class, modality or "
            "body part not analysed here, 0xC000 cannot understand, 0xA700 out of resources",
            {"type": "integer"},
        ),
    },
}
STORE_RESPONSE = {
    "type": "object",
    "properties": {
        "00081190": _dicom_json_attribute(
            "UR",
            "RetrieveURL of the study's results (absolute under FRACTURE_PUBLIC_URL)",
            {"type": "string"},
        ),
        "00081198": _dicom_json_attribute("SQ", "FailedSOPSequence", _SOP_ITEM),
        "00081199": _dicom_json_attribute("SQ", "ReferencedSOPSequence", _SOP_ITEM),
    },
}
_STORE = {"application/dicom+json": {"schema": STORE_RESPONSE}}
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
        "200": {
            "description": "every instance stored and analysed; with Accept: application/json "
            "our findings instead (request_id, studies: the answers, failed: a count, "
            "failures: each refused instance with its error code)",
            "content": {**_STORE, "application/json": {}},
        },
        "202": {
            "description": "some instances stored, some failed (FailedSOPSequence)",
            "content": _STORE,
        },
        "409": {
            "description": "no instance stored (FailedSOPSequence says why)",
            "content": _STORE,
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
    service: FractureService,
    url_study: str | None,
    fp_per_image: float | None,
    score_threshold: float | None,
) -> Response:
    """STOW-RS: read the parts, keep and check each instance, analyse the accepted ones as one
    study per StudyInstanceUID, answer per instance (200, 202 with failures, 409 all failed)."""
    boundary = _related_boundary(request)
    plan = service.plan(fp_per_image=fp_per_image, score_threshold=score_threshold)
    parts = await _read_parts(request, boundary, service.settings.max_images_per_request)
    await _check_intake(service, len(parts))
    async with service.admission.admit():  # 503 with Retry-After when the queue is full
        studies, failed = await _accept(service, parts, url_study)
        request_id = request_id_of(request)
        # Never the caller's Host header in what is stored: it would be shown to others.
        stored_base = (service.settings.public_url or "").rstrip("/")
        answers = await analyse_instances(service, studies, plan, request_id, stored_base)
    log.info(
        "request %s: STOW-RS %d instance(s), %d failed, %d study(ies) analysed",
        request_id,
        len(parts),
        len(failed),
        len(studies),
    )
    return _stow_response(request, service, url_study, studies, failed, answers, request_id)


def _related_boundary(request: Request) -> str:
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
    return params.get("boundary", "")


async def _read_parts(request: Request, boundary: str, limit: int) -> list[Any]:
    """The body's parts, parsed as it streams in (memory is the parts, not copies of the body)."""
    try:
        parser = RelatedParser(boundary, limit)
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
    return parts


async def _check_intake(service: FractureService, arriving: int) -> None:
    """503 with Retry-After when the instances would overfill the intake."""
    kept = await asyncio.to_thread(service.results.intake_size)
    if kept + arriving > service.settings.max_intake_instances:
        raise ApiError(
            503,
            "intake_full",
            f"{kept} instances wait for analysis; the intake holds "
            f"{service.settings.max_intake_instances}: send again later",
            headers={"Retry-After": "30"},
        )


async def _accept(
    service: FractureService, parts: list[Any], url_study: str | None
) -> tuple[OrderedDict[str, list[Accepted]], list[tuple[Dataset, Refused]]]:
    """The accepted instances by study, and a FailedSOPSequence item for each refused one."""
    failed: list[tuple[Dataset, Refused]] = []
    studies: OrderedDict[str, list[Accepted]] = OrderedDict()
    for part in parts:
        ptype = media_params(part.content_type)[0] if part.content_type else "application/dicom"
        outcome: Accepted | Refused
        if ptype != "application/dicom":
            outcome = Refused("", "", CANNOT_UNDERSTAND)
        else:
            outcome = await run_in_threadpool(read_instance, part.body, service, url_study)
        if isinstance(outcome, Accepted):
            studies.setdefault(outcome.image.study_instance_uid or "", []).append(outcome)
        else:
            item = _sop_item(outcome.sop_class, outcome.sop_uid)
            item.FailureReason = outcome.reason
            failed.append((item, outcome))
            service.metrics.images.labels("rejected").inc()
    return studies, failed


def _stow_response(
    request: Request,
    service: FractureService,
    url_study: str | None,
    studies: OrderedDict[str, list[Accepted]],
    failed: list[tuple[Dataset, Refused]],
    answers: list[Any],
    request_id: str,
) -> Response:
    """The PS3.18 store response (DICOM JSON), or our JSON findings for `Accept:
    application/json`. RetrieveURL is absolute (PS3.18): under FRACTURE_PUBLIC_URL, else the
    address this server listens on, never the caller's Host header (a forged one would travel
    on in the links)."""
    referenced = [
        _sop_item(str(a.header.SOPClassUID), str(a.header.SOPInstanceUID))
        for accepted in studies.values()
        for a in accepted
    ]
    status = 200 if not failed else (202 if referenced else 409)
    accept = request.headers.get("accept", "")
    if "application/json" in accept and "dicom+json" not in accept:
        body = StowJson(
            request_id=request_id,
            studies=answers,
            failed=len(failed),
            failures=[
                StowFailure(
                    sop_instance_uid=r.sop_uid or None,
                    failure_reason=r.reason,
                    error=r.error,
                    detail=r.detail,
                )
                for _, r in failed
            ],
        )
        return _json(body.model_dump(mode="json"), status)
    response = Dataset()
    if url_study or len(studies) == 1:
        base = (service.settings.public_url or _listening_url(request)).rstrip("/")
        response.RetrieveURL = f"{base}/dicomweb/studies/{url_study or next(iter(studies))}"
    if failed:
        response.FailedSOPSequence = [item for item, _ in failed]
    if referenced:
        response.ReferencedSOPSequence = referenced
    headers = (
        {"Link": ", ".join(f'<{a.results_url}/findings>; rel="describedby"' for a in answers)}
        if answers
        else {}
    )
    return _json(response.to_json_dict(), status, "application/dicom+json", headers)


def _listening_url(request: Request) -> str:
    """scheme://host:port of the socket this request came in on (ASGI `server`), which no
    header can change."""
    host, port = request.scope.get("server") or ("127.0.0.1", 80)
    host = f"[{host}]" if ":" in str(host) else host
    return f"{request.url.scheme}://{host}:{port}"


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
    service: ServiceDep,
    fp_per_image: FpPerImage = None,
    score_threshold: ScoreThreshold = None,
) -> Response:
    return await _store(request, service, None, fp_per_image, score_threshold)


@router.post(
    "/dicomweb/studies/{study_uid}",
    summary="STOW-RS: store (analyse) instances of one study",
    openapi_extra=STOW_DOC,
    responses=errors(400, 413, 415, 422, 503),
)
async def store_study_instances(
    request: Request,
    service: ServiceDep,
    study_uid: str = Path(..., pattern=UID_PATTERN, max_length=64),
    fp_per_image: FpPerImage = None,
    score_threshold: ScoreThreshold = None,
) -> Response:
    return await _store(request, service, study_uid, fp_per_image, score_threshold)


# One analysis of a study (its result_id, as STOW-RS answered it) rather than the latest.
ResultId = Annotated[
    str | None,
    Query(
        pattern="^[0-9a-f]{8,32}$",
        description="one analysis of the study (result_id); default: the latest",
    ),
]


async def _result_or_404(
    service: FractureService, study_uid: str, result_id: str | None = None
) -> StudyResult:
    result = await asyncio.to_thread(service.results.get, study_uid, result_id)
    if result is None:
        raise ApiError(
            404,
            "unknown_study",
            "no results for this study here (never analysed, or past retention)"
            if result_id is None
            else "no such analysis of this study here (or past retention)",
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
    service: ServiceDep,
    study_uid: str = Path(..., pattern=UID_PATTERN, max_length=64),
    result_id: ResultId = None,
) -> Response:
    result = await _result_or_404(service, study_uid, result_id)
    body, ctype = build_related(result.instances)
    return Response(body, media_type=ctype.split(";")[0], headers={"content-type": ctype})


@router.get(
    "/dicomweb/studies/{study_uid}/findings",
    summary="our JSON findings of a study, and their delivery",
    response_model=Findings,
    responses=errors(404, 422),
)
async def study_findings(
    service: ServiceDep,
    study_uid: str = Path(..., pattern=UID_PATTERN, max_length=64),
    result_id: ResultId = None,
) -> Findings:
    result = await _result_or_404(service, study_uid, result_id)
    return Findings(
        **result.findings.model_dump(),
        delivery=Delivery(
            destination_configured=service.deliverer is not None,
            delivered=result.delivered,
            attempts=result.attempts,
            last_error=result.last_error,
            given_up=result.given_up,
        ),
    )
