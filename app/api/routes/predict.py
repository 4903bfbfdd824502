"""POST /v1/predict: one study (one or many images) in, probabilities and boxes out."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app import operating_point as op
from app.core.errors import ApiError
from app.decoding import DecodedImage, decode
from app.pipeline import ImageWork, image_answer, run_study
from app.runtime import OnnxModel
from app.state import AppState

log = logging.getLogger("app.predict")
router = APIRouter(tags=["inference"])

UPLOAD_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["files"],
                }
            },
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


async def read_uploads(
    request: Request, max_images: int
) -> list[tuple[bytes, str | None, str | None]]:
    """(bytes, content type, filename) per uploaded image, from multipart or a raw body."""
    ctype = request.headers.get("content-type", "")
    if ctype.lower().startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=max_images + 1, max_fields=100)
        except ApiError:
            raise
        except Exception as exc:
            raise ApiError(
                400,
                "invalid_multipart",
                f"the multipart body cannot be parsed ({type(exc).__name__})",
            ) from None
        parts = [
            v for key in ("files", "file") for v in form.getlist(key) if isinstance(v, UploadFile)
        ]
        if not parts:
            raise ApiError(400, "no_files", "the multipart body has no 'files' part with an image")
        if len(parts) > max_images:
            raise ApiError(
                413,
                "too_many_images",
                f"{len(parts)} images in one request; the limit is {max_images}",
            )
        return [(await p.read(), p.content_type, p.filename) for p in parts]
    if ctype.lower().startswith("multipart/"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{ctype.split(';')[0]} is not accepted here; use multipart/form-data",
        )
    body = await request.body()
    if not body:
        raise ApiError(
            400, "empty_body", "the request has no body: send an image or multipart files"
        )
    return [(body, ctype, None)]


def _decode_all(
    state: AppState, uploads: list[tuple[bytes, str | None, str | None]]
) -> list[ImageWork]:
    s = state.settings
    works = []
    for i, (data, ctype, filename) in enumerate(uploads):
        t0 = time.perf_counter()
        try:
            image: DecodedImage = decode(
                data, ctype, filename, s.max_image_pixels, s.allowed_modalities
            )
        except ApiError as exc:
            state.metrics.images.labels("rejected").inc(len(uploads))
            label = (
                f"file {i}" + (f" ({filename})" if filename else "")
                if len(uploads) > 1 or filename
                else ""
            )
            raise ApiError(
                exc.status, exc.code, f"{label}: {exc.detail}" if label else exc.detail
            ) from None
        seconds = time.perf_counter() - t0
        state.metrics.stage_duration.labels("decode").observe(seconds)
        works.append(ImageWork(image=image, decode_ms=round(1000 * seconds, 2)))
    return works


def _pick(state: AppState, role: str, name: str | None, default: str) -> OnnxModel:
    try:
        return state.registry.get(role, name, default)
    except KeyError:
        names = ", ".join(sorted(state.registry.by_role(role)))
        raise ApiError(
            422, f"unknown_{role}", f"no {role} named {name!r}; served: {names}"
        ) from None


def request_id_of(request: Request) -> str:
    """The caller's X-Request-ID when it is a plain token, else a new one."""
    given = request.headers.get("x-request-id", "")[:64]
    return given if given and given.replace("-", "").isalnum() else uuid.uuid4().hex


def resolve_models(
    state: AppState,
    classifier: str | None,
    detector: str | None,
    fp_per_image: float | None,
    score_threshold: float | None,
) -> tuple[OnnxModel, OnnxModel, OnnxModel, op.OperatingPoint]:
    """Cropper, classifier, detector and operating point of a request; 4xx when wrong."""
    if not state.ready:
        raise ApiError(503, "not_ready", state.not_ready_reason)
    s = state.settings
    clf = _pick(state, "classifier", classifier, s.default_classifier)
    det = _pick(state, "detector", detector, s.default_detector)
    crp = _pick(state, "cropper", None, "")
    try:
        if score_threshold is not None:
            point = op.from_score(score_threshold)
        else:
            rate = s.default_fp_per_image if fp_per_image is None else fp_per_image
            point = op.from_fp_rate(det.card["operating_points"], rate)
    except ValueError as exc:
        raise ApiError(422, "invalid_operating_point", str(exc)) from None
    return crp, clf, det, point


@router.post(
    "/v1/predict", summary="fracture probability and boxes for one study", openapi_extra=UPLOAD_DOC
)
async def predict(
    request: Request,
    fp_per_image: float | None = Query(
        None, description="operating point in false positives per image, 0.1 to 0.5 (default 0.4)"
    ),
    score_threshold: float | None = Query(
        None, description="detector score threshold; overrides fp_per_image"
    ),
    classifier: str | None = Query(None, description="classifier name (see /v1/models)"),
    detector: str | None = Query(None, description="detector name (see /v1/models)"),
) -> dict[str, Any]:
    state: AppState = request.app.state.fracture
    crp, clf, det, point = resolve_models(
        state, classifier, detector, fp_per_image, score_threshold
    )
    request_id = request_id_of(request)
    uploads = await read_uploads(request, state.settings.max_images_per_request)

    async with state.inference_slots:
        works = await run_in_threadpool(_decode_all, state, uploads)
    return await analyse_study(state, works, point, (crp, clf, det), request_id)


async def analyse_study(
    state: AppState,
    works: list[ImageWork],
    point: op.OperatingPoint,
    models: tuple[OnnxModel, OnnxModel, OnnxModel],
    request_id: str,
) -> dict[str, Any]:
    """Run the pipeline on the decoded images of one study; the answer of /v1/predict."""
    crp, clf, det = models

    def on_stage(stage: str, seconds: float, n: int) -> None:
        state.metrics.stage_duration.labels(stage).observe(seconds)
        state.metrics.batch_size.labels(stage).observe(n)

    async with state.inference_slots:
        await run_in_threadpool(
            run_study, works, crp, clf, det, point, state.settings.crop_margin, on_stage
        )

    threshold = float(clf.card["decision_threshold"])
    images = [image_answer(i, w, threshold) for i, w in enumerate(works)]
    for img in images:
        state.metrics.images.labels("fracture" if img["fracture"] else "no_fracture").inc()
    study_p = max(img["fracture_probability"] for img in images)
    log.info("request %s: %d image(s), study probability %.3f", request_id, len(images), study_p)
    return {
        "request_id": request_id,
        "models": {m.role: {"name": m.name, "version": m.version} for m in (crp, clf, det)},
        "operating_point": point.as_dict(),
        "decision_threshold": threshold,
        "images": images,
        "study": {
            "fracture_probability": study_p,
            "fracture": any(img["fracture"] for img in images),
            "images": len(images),
        },
    }
