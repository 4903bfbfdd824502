"""POST /v1/predict: one study (one or many images) in, probabilities and boxes out."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import FpPerImage, ScoreThreshold, ServiceDep, request_id_of
from app.api.schemas import errors
from app.core.errors import ApiError
from app.dicom.multipart import MultipartError, RelatedParser, TooManyPartsError, media_params
from app.inference.answers import NotAnalysed, StudyAnswer
from app.inference.decoding import DecodedImage, decode
from app.inference.pipeline import ImageWork
from app.inference.scope import refuse_out_of_scope
from app.service import FractureService
from app.study import file_label, refuse_mixed_studies

log = logging.getLogger("app.predict")
# Form fields besides the images that a multipart upload may carry (ignored).
MAX_OTHER_FIELDS = 100
router = APIRouter(tags=["inference"])

UPLOAD_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                        }
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
        # Our streaming parser, not Starlette's form: a part named with `filename*=` only is
        # an upload too (Starlette would decode it as a text field and lose its bytes).
        try:
            parser = RelatedParser(
                media_params(ctype)[1].get("boundary", ""), max_images + MAX_OTHER_FIELDS
            )
            async for chunk in request.stream():
                parser.feed(chunk)
            parts = parser.finish()
        except TooManyPartsError:
            raise ApiError(
                413, "too_many_images", f"more than {max_images} images in one request"
            ) from None
        except MultipartError as exc:
            raise ApiError(400, "invalid_multipart", str(exc)) from None
        uploads = []
        for part in parts:
            name, filename = part.form_field()
            if name in ("files", "file"):
                uploads.append((part.body, part.content_type or None, filename))
        if not uploads:
            raise ApiError(400, "no_files", "the multipart body has no 'files' part with an image")
        if len(uploads) > max_images:
            raise ApiError(
                413,
                "too_many_images",
                f"{len(uploads)} images in one request; the limit is {max_images}",
            )
        return uploads
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
    service: FractureService, uploads: list[tuple[bytes, str | None, str | None]]
) -> tuple[list[ImageWork], list[NotAnalysed]]:
    """The decoded images, and the files of a multi-image request that were refused one by one
    (the others are analysed). A single file, or every file refused: its error (the first)."""
    s = service.settings
    works, refused, first = [], [], None
    for i, (data, ctype, filename) in enumerate(uploads):
        t0 = time.perf_counter()
        try:
            image: DecodedImage = decode(
                data, ctype, filename, s.max_image_pixels, s.allowed_modalities
            )
            refuse_out_of_scope(image, s.allowed_body_parts)
        except ApiError as exc:
            service.metrics.images.labels("rejected").inc()
            service.metrics.refused.labels(exc.code).inc()
            label = file_label(i, filename) if len(uploads) > 1 or filename else ""
            first = first or ApiError(
                exc.status, exc.code, f"{label}: {exc.detail}" if label else exc.detail
            )
            refused.append(
                NotAnalysed(index=i, filename=filename, error=exc.code, detail=exc.detail)
            )
            continue
        seconds = time.perf_counter() - t0
        service.metrics.stage_duration.labels("decode").observe(seconds)
        works.append(ImageWork(image=image, decode_ms=round(1000 * seconds, 2), index=i))
    if first is not None and not works:
        raise first
    return works, refused


@router.post(
    "/v1/predict",
    summary="fracture probability and boxes for one study",
    openapi_extra=UPLOAD_DOC,
    response_model=StudyAnswer,
    responses=errors(400, 413, 415, 422, 503),
)
async def predict(
    request: Request,
    service: ServiceDep,
    fp_per_image: FpPerImage = None,
    score_threshold: ScoreThreshold = None,
    classifier: str | None = Query(None, description="classifier name (see /v1/models)"),
    detector: str | None = Query(None, description="detector name (see /v1/models)"),
) -> StudyAnswer:
    plan = service.plan(classifier, detector, fp_per_image, score_threshold)
    request_id = request_id_of(request)
    uploads = await read_uploads(request, service.settings.max_images_per_request)
    async with service.admission.admit():
        async with service.inference_slots:
            await service.abandon_if_gone(request.is_disconnected, request_id)
            works, refused = await run_in_threadpool(_decode_all, service, uploads)
            try:
                refuse_mixed_studies([w.image for w in works])
            except ApiError:
                service.metrics.images.labels("rejected").inc(len(works))
                raise
        return await service.analyse(
            works,
            plan,
            request_id,
            request.is_disconnected,
            not_analysed=refused,
            refuse_unreadable_images=True,
        )
