"""Uploads -> grey images plus metadata: what a body is (sniffed from its bytes first), then its
decoder: DICOM in app/inference/dicom_decoding.py, PNG and JPEG in app/inference/raster.py, the
decoded image and the checks they share in app/inference/images.py. The names other modules
use are importable from here."""

from __future__ import annotations

from collections.abc import Sequence

from app.core.errors import ApiError
from app.inference.dicom_decoding import (
    decode_dicom,
    decode_dicom_dataset,
    inflated_dataset_limit,
    parse_dicom,
)
from app.inference.images import (
    WORKING_SIDE,
    DecodedImage,
    lenient_pillow,
    reduce_pixels,
    reduction,
    refuse_without_anatomy,
)
from app.inference.raster import JPEG_MAGIC, MAX_MISSING_ROWS, PNG_MAGIC, decode_raster

__all__ = [
    "MAX_MISSING_ROWS",
    "WORKING_SIDE",
    "DecodedImage",
    "decode",
    "decode_dicom",
    "decode_dicom_dataset",
    "inflated_dataset_limit",
    "lenient_pillow",
    "parse_dicom",
    "reduce_pixels",
    "reduction",
    "refuse_without_anatomy",
    "sniff",
]

DICOM_TYPES = {"application/dicom", "application/dicom+octet-stream"}


IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg"}


def sniff(data: bytes, content_type: str | None) -> str:
    """'dicom', 'png' or 'jpeg' from the bytes first, then the declared type; else 415."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if ctype in DICOM_TYPES:
        return "dicom"  # DICOM without preamble/file meta: pydicom reads it with force=True
    if ctype in IMAGE_TYPES:
        raise ApiError(
            422, "undecodable_image", f"the body is declared {ctype} but is not a valid image"
        )
    raise ApiError(
        415,
        "unsupported_media_type",
        f"unsupported content type {ctype or 'unknown'}: send application/dicom, image/png or image/jpeg",
    )


def decode(
    data: bytes,
    content_type: str | None,
    filename: str | None,
    max_pixels: int,
    allowed_modalities: Sequence[str],
) -> DecodedImage:
    if not data:
        raise ApiError(400, "empty_file", "the file is empty")
    kind = sniff(data, content_type)
    if kind == "dicom":
        image = decode_dicom(data, max_pixels, allowed_modalities)
    else:
        image = decode_raster(data, kind, max_pixels)
    image.filename = filename
    return image
