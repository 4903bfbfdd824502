"""The viewer page (GET /viewer, static files in app/viewer/, no build step) and the preview it
draws on (POST /v1/preview): the image exactly as the service decoded it, grey-stretched and
downsampled to at most 1024 px, so a DICOM looks in the browser as the models saw it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.api.deps import ServiceDep
from app.api.routes.predict import UPLOAD_DOC, read_uploads
from app.api.schemas import errors
from app.core.errors import ApiError
from app.inference.decoding import decode
from app.inference.preprocessing import stretch_grey
from app.service import FractureService

STATIC = Path(__file__).resolve().parents[2] / "viewer"
# The page runs its own script and style only, sends its calls to this service only, draws blob:
# previews, and may not be framed (clickjacking).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PREVIEW_LONG_SIDE = 1024
router = APIRouter(tags=["viewer"])


@router.get(
    "/viewer",
    summary="the viewer page",
    response_class=FileResponse,
    responses={200: {"content": {"text/html": {}}}},
)
async def viewer_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get(
    "/viewer/{name}",
    summary="the viewer's script and style",
    response_class=FileResponse,
    responses={200: {"content": {"text/javascript": {}, "text/css": {}}}, **errors(404, 422)},
)
async def viewer_asset(name: str) -> FileResponse:
    path = STATIC / name
    if name not in ("viewer.js", "viewer.css") or not path.is_file():
        raise ApiError(404, "not_found", f"no viewer file {name!r}")
    return FileResponse(path, headers=PAGE_HEADERS)


def preview_png(
    data: bytes, ctype: str | None, service: FractureService
) -> tuple[bytes, int, int, str]:
    s = service.settings
    image = decode(data, ctype, None, s.max_image_pixels, s.allowed_modalities)
    grey = (stretch_grey(image.pixels) * 255).astype(np.uint8)
    im = Image.fromarray(grey)
    scale = PREVIEW_LONG_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), image.width, image.height, image.patient_key or ""


@router.post(
    "/v1/preview",
    summary="the first uploaded image as the service decoded it, as PNG (at most 1024 px)",
    openapi_extra=UPLOAD_DOC,
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "X-Image-Width / X-Image-Height give the decoded size",
        },
        **errors(400, 413, 415, 422),
    },
)
async def preview(request: Request, service: ServiceDep) -> Response:
    uploads = await read_uploads(request, 1)
    data, ctype, _ = uploads[0]
    png, width, height, patient = await run_in_threadpool(preview_png, data, ctype, service)
    # Nothing is stored; the answer is for this browser only.
    return Response(
        png,
        media_type="image/png",
        headers={
            "X-Image-Width": str(width),
            "X-Image-Height": str(height),
            # a digest of PatientID (never the ID): the page warns before mixing patients
            "X-Patient-Key": patient,
            "Cache-Control": "no-store",
        },
    )
