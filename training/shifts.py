"""Source shifts for evaluation: FracAtlas images degraded the way other hospitals' radiographs
differ (lower resolution, or 512 px on the long side as the other source is described, lower
contrast, another vendor's image processing (local contrast equalised, edges enhanced), strong
JPEG compression, burned-in markers, another orientation, a scan set down at any
angle, reversed polarity, a data set's square export: stretched, or letterboxed on grey; and, as
a check of our own decoding, the same pixels stored as a MONOCHROME1 DICOM that the service must
show as they were), so that generalisation can be measured with the labels we have. Each shift is
deterministic per image (seeded by its id) and moves the fracture boxes with the pixels.
"""

from __future__ import annotations

import io
import random
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from app.inference.upright import enclosing_boxes
from training.augment import burn_marker, vendor_processing

SHIFTS = (
    "none",
    "lowres",
    "lowres512",
    "contrast",
    "processing",
    "jpeg",
    "markers",
    "rot90",
    "rotate",
    "all",
    "all-rotate",
    "all-rotate-512",
    "invert",
    "monochrome1",
    "stretch512",
    "letterbox512",
)
# the combined shifts, as the single degradations they apply (each other shift is itself)
COMBINED = {
    "all": {"lowres", "contrast", "markers", "rot90", "jpeg"},
    "all-rotate": {"lowres", "contrast", "markers", "rotate", "jpeg"},  # any angle instead
    # the other source as described: about 512 px on the long side, not 60% of FracAtlas's
    "all-rotate-512": {"lowres512", "contrast", "markers", "rotate", "jpeg"},
}
# `lowres512`: the long side brought down to this many pixels (a smaller image is kept)
LONG_SIDE = 512
# The `markers` shift's painter, looked up per call: an experiment that measures another marker
# style (research/marker_styles.py) sets its own here.
paint_marker: Callable[[np.ndarray, random.Random], None] = burn_marker


def base_shift(name: str) -> str:
    """The shift a name applies: `rotate@2` is `rotate` with its random numbers drawn again
    (a draw of its own per image, seeded by the whole name: `rotate` itself is draw 0)."""
    kind, at, draw = name.partition("@")
    if kind not in SHIFTS or (at and not (draw.isdigit() and int(draw) > 0)):
        raise ValueError(f"unknown shift {name!r}; one of {SHIFTS}, optionally @N (N >= 1)")
    return kind


def shift_name(text: str) -> str:
    """One shift name (a command-line type): `all-rotate`, or `all-rotate@1` for another draw."""
    import argparse

    try:
        base_shift(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def shift_names(text: str) -> tuple[str, ...]:
    """A comma-separated list of shift names (a command-line type): unknown names refused."""
    return tuple(shift_name(name) for name in text.split(","))


def _resize(grey: np.ndarray, width: int, height: int) -> np.ndarray:
    """The image at width x height (area resampling)."""
    import cv2

    return cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)


def _shrink(grey: np.ndarray, factor: float) -> np.ndarray:
    """The image scaled by `factor` per side, at least 8 px. Bilinear, cv2's default: the third
    positional argument of cv2.resize is `dst`, not the interpolation, and every published
    lowres figure was measured so; area resampling would change them."""
    import cv2

    h, w = grey.shape
    return cv2.resize(grey, (max(8, round(w * factor)), max(8, round(h * factor))), cv2.INTER_AREA)


# what detector data sets pad a letterboxed square with (ultralytics' and many exports' grey)
LETTERBOX_GREY = 114


def _letterbox(grey: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image scaled to LONG_SIDE on its long side and centred on a LONG_SIDE square of
    LETTERBOX_GREY; normalised boxes follow."""
    h, w = grey.shape
    f = LONG_SIDE / max(h, w)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    y0, x0 = (LONG_SIDE - nh) // 2, (LONG_SIDE - nw) // 2
    out = np.full((LONG_SIDE, LONG_SIDE), LETTERBOX_GREY, np.uint8)
    out[y0 : y0 + nh, x0 : x0 + nw] = _resize(grey, nw, nh)
    scale = np.array([nw, nh, nw, nh], np.float32)
    offset = np.array([x0, y0, x0, y0], np.float32)
    return out, ((boxes * scale + offset) / LONG_SIDE).astype(np.float32)


def _rot90(grey: np.ndarray, boxes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate counter-clockwise k quarter turns; normalised xyxy boxes follow."""
    out = np.rot90(grey, k).copy()
    b = boxes.copy()
    for _ in range(k % 4):  # (x, y) -> (y, 1 - x) per quarter turn, counter-clockwise
        x1, y1, x2, y2 = b[:, 0].copy(), b[:, 1].copy(), b[:, 2].copy(), b[:, 3].copy()
        b = np.stack([y1, 1 - x2, y2, 1 - x1], axis=1)
    return out, b


def rotate_grown(
    grey: np.ndarray, boxes: np.ndarray, degrees: float, fill: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate counter-clockwise by any angle on a canvas grown to keep every pixel (corners at
    `fill`: black, as a tilted film scanned square); each box becomes the upright box around its
    rotated corners."""
    import cv2

    h, w = grey.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(h * sin + w * cos)), int(np.ceil(h * cos + w * sin))
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    out = cv2.warpAffine(grey, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=fill)
    upright = enclosing_boxes(boxes * [w, h, w, h], m) / [nw, nh, nw, nh]
    return out, np.clip(upright, 0, 1).astype(np.float32)


# The `rotate` shift's turn, looked up per call: an experiment that fills the corners otherwise
# or leaves the turn out (research/combined_shift_parts.py) sets its own here.
rotate_any: Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]] = rotate_grown


def _monochrome1_dicom(grey: np.ndarray) -> bytes:
    """A 12-bit MONOCHROME1 DX file of a grey image: stored values high where it is dark, as
    such a detector writes them; decoding must invert them back."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME1", 1
    ds.Rows, ds.Columns = grey.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = ((255 - grey.astype(np.uint16)) * 16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def shift_image(
    grey: np.ndarray, boxes: np.ndarray, kind: str, image_id: str
) -> tuple[bytes, str, np.ndarray]:
    """(encoded bytes, content type, boxes) of one grey uint8 image under a shift (a name of
    base_shift's)."""

    rng = random.Random(zlib.crc32(f"{kind}:{image_id}".encode()))
    kind = base_shift(kind)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = grey.copy()
    steps = COMBINED.get(kind, {kind})
    if "lowres" in steps:  # about 60% of the pixels per side, kept small
        out = _shrink(out, 0.6)
    if "lowres512" in steps and max(out.shape) > LONG_SIDE:
        out = _shrink(out, LONG_SIDE / max(out.shape))
    if "contrast" in steps:  # flatter, brighter: a different detector and LUT
        f = out.astype(np.float32) / 255.0
        f = 0.5 + (f**1.4 - 0.5) * 0.6 + 0.08
        out = (np.clip(f, 0, 1) * 255).astype(np.uint8)
    if "processing" in steps:
        out = vendor_processing(out, rng)
    if "invert" in steps:  # a MONOCHROME1 image exported without its LUT: bone dark, air white
        out = 255 - out
    if "markers" in steps:
        for _ in range(2):
            paint_marker(out, rng)
    if "rot90" in steps:
        out, boxes = _rot90(out, boxes, rng.randrange(1, 4))
    if "rotate" in steps:  # any angle, not only quarter turns
        out, boxes = rotate_any(out, boxes, rng.uniform(0.0, 360.0))
    if "stretch512" in steps:  # both sides to LONG_SIDE: the anatomy's aspect changes
        out = _resize(out, LONG_SIDE, LONG_SIDE)
    if "letterbox512" in steps:  # long side to LONG_SIDE, centred on a square of grey 114
        out, boxes = _letterbox(out, boxes)
    if "monochrome1" in steps:
        return _monochrome1_dicom(out), "application/dicom", boxes
    buf = io.BytesIO()
    if "jpeg" in steps:
        Image.fromarray(out).save(buf, format="JPEG", quality=35)
        return buf.getvalue(), "image/jpeg", boxes
    Image.fromarray(out).save(buf, format="PNG")
    return buf.getvalue(), "image/png", boxes
