"""PNG and JPEG uploads -> DecodedImage, hardened: EXIF orientation applied, 8/16-bit grey or
colour (to grey), truncated files analysed as far as they decode (with a note) or refused past
MAX_MISSING_ROWS, and headers claiming more pixels than their bytes could hold refused before
decoding (decompression bombs)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from app.core.errors import ApiError
from app.inference.images import (
    DecodedImage,
    lenient_pillow,
    reduction,
    refuse_without_anatomy,
    working_image,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


JPEG_MAGIC = b"\xff\xd8\xff"


# A truncated JPEG/PNG is analysed (with a note) while at most this share of its rows is missing;
# FracAtlas's own truncated JPEGs lose up to 51% of their rows and are analysed; more is 422.
MAX_MISSING_ROWS = 0.55


# The fewest bytes a real image of w x h pixels needs: deflate cannot beat ~1032:1 (PNG, per
# byte of raw pixels), a baseline JPEG spends at least a bit per 8x8 block.
PNG_MAX_RATIO = 1100


JPEG_MIN_BITS_PER_BLOCK = 1


def _truncated(data: bytes, kind: str) -> bool:
    """No end marker: JPEG EOI (FFD9) or PNG IEND near the end of the bytes."""
    tail = data[-64:]
    return b"\xff\xd9" not in tail if kind == "jpeg" else b"IEND" not in tail


def _missing_row_share(im: Image.Image) -> float:
    """Share of rows at the bottom that a truncated decode filled with one constant value."""
    grey = np.asarray(im.convert("L"))
    rows = grey.min(axis=1) == grey.max(axis=1)
    constant = rows & (grey[:, 0] == grey[-1, 0])
    if not constant[-1]:
        return 0.0
    filled = np.flatnonzero(~constant[::-1])
    return (int(filled[0]) if filled.size else len(constant)) / len(constant)


def _check_dimensions_fit(data: bytes, kind: str, w: int, h: int) -> None:
    """422 before decoding when the header claims more pixels than the bytes could hold."""
    if kind == "png":
        channels = 1 if _png_is_grey(data) else 3
        least = w * h * channels // PNG_MAX_RATIO
    else:
        least = (w * h // 64) * JPEG_MIN_BITS_PER_BLOCK // 8
    if len(data) < least:
        raise ApiError(
            422,
            "dimensions_exceed_data",
            f"the {kind.upper()} header claims {w}x{h} pixels but the file has {len(data)} bytes, "
            f"fewer than any such image needs ({least})",
        )


def _png_is_grey(data: bytes) -> bool:
    """PNG colour type from the IHDR chunk: 0 (grey) or 4 (grey + alpha)."""
    return len(data) > 25 and data[25] in (0, 4)


def decode_raster(data: bytes, kind: str, max_pixels: int) -> DecodedImage:
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise ApiError(
            422,
            "undecodable_image",
            f"the {kind.upper()} file cannot be read ({type(exc).__name__})",
        ) from None
    w, h = im.size
    if w * h > max_pixels:
        raise ApiError(
            413, "image_too_large", f"the image has {w}x{h} pixels, over the limit of {max_pixels}"
        )
    _check_dimensions_fit(data, kind, w, h)
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = _load_raster(im, data, kind)
            if _truncated(data, kind):
                missing = _missing_row_share(im)
                if missing > MAX_MISSING_ROWS:
                    raise ApiError(
                        422,
                        "truncated_image",
                        f"the {kind.upper()} file is truncated: {missing:.0%} of its rows are "
                        f"missing (at most {MAX_MISSING_ROWS:.0%} is analysed)",
                    )
                notes.append(
                    f"the {kind.upper()} file is truncated: {missing:.0%} of its rows are "
                    "missing and were analysed as filled"
                )
            frame = (h, w)
            exif_orientation = im.getexif().get(0x0112, 1)
            im = ImageOps.exif_transpose(im)
            if exif_orientation in (5, 6, 7, 8):  # a quarter turn: the frame is transposed
                frame = (w, h)
    except ApiError:
        raise
    except Exception as exc:
        raise ApiError(
            422,
            "undecodable_image",
            f"the {kind.upper()} file cannot be decoded ({type(exc).__name__})",
        ) from None
    colour = None  # the share of coloured pixels, for a colour image
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(im, dtype=np.float32)
    elif im.mode in ("L", "1"):
        pixels = np.asarray(im.convert("L"))
    else:
        # Colour (or palette, alpha): luminance; FracAtlas JPEGs are RGB with R = G = B.
        rgb = im.convert("RGB")
        colour = coloured_share(rgb)
        pixels = np.asarray(rgb.convert("L"))
    pixels, frame_size = working_image(pixels, frame)
    refuse_without_anatomy(pixels)
    return DecodedImage(
        pixels=pixels, source=kind, notes=notes, frame_size=frame_size, coloured_share=colour
    )


# A pixel whose channels differ by more than this (of 255) is coloured: JPEG's chroma noise on a
# grey image stays far below it (FracAtlas's RGB JPEGs: 0).
COLOURED_PIXEL = 24


def coloured_share(rgb: Image.Image) -> float:
    """The share of coloured pixels, on a copy reduced to at most 512 px a side."""
    k = max(1, max(rgb.size) // 512)
    a = np.asarray(rgb.reduce(k) if k > 1 else rgb, dtype=np.int16)
    return float(np.mean(a.max(axis=2) - a.min(axis=2) > COLOURED_PIXEL))


def _load_raster(im: Image.Image, data: bytes, kind: str) -> Image.Image:
    """Decode an opened JPEG/PNG; a truncated one (no end marker) as far as its bytes go."""

    def prepared(im: Image.Image) -> Image.Image:
        if kind == "jpeg" and im.mode in ("RGB", "YCbCr", "CMYK", "L"):
            # The luminance only (what RGB -> L would give; FracAtlas: exactly), and at the
            # working scale by DCT scaling when the image is large.
            w, h = im.size
            k = reduction(h, w)
            im.draft("L", (-(-w // k), -(-h // k)))
        return im

    try:
        prepared(im).load()
        return im
    except OSError:
        if not _truncated(data, kind):
            raise
    with lenient_pillow():
        im = prepared(Image.open(io.BytesIO(data)))
        im.load()
        return im
