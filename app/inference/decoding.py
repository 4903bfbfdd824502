"""Uploads -> grey float images plus metadata. DICOM (pydicom + pylibjpeg), PNG, JPEG.

DICOM: modality LUT (rescale), VOI LUT or window, MONOCHROME1 inverted, unused high bits
masked. Policy, also in the README: multi-frame objects and modalities outside
`allowed_modalities` (e.g. MG) are refused with 422, never guessed at. PNG/JPEG: EXIF orientation
applied, 8/16-bit, grey or colour (to grey), truncated JPEGs accepted as far as they decode.
Patient identifiers are never read into the result, so they cannot reach a log or an answer.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps
from pydicom.dataset import Dataset

from app.core.errors import ApiError

# Some FracAtlas JPEGs miss their last bytes; decode what is there rather than refuse.
ImageFile.LOAD_TRUNCATED_IMAGES = True
# Our own pixel limit (413) replaces Pillow's DecompressionBombError.
Image.MAX_IMAGE_PIXELS = None

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_TYPES = {"application/dicom", "application/dicom+octet-stream"}
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg"}
GENERIC_TYPES = {"", "application/octet-stream"}
# A truncated JPEG/PNG is analysed (with a note) while at most this share of its rows is missing;
# FracAtlas's own truncated JPEGs lose up to 51% of their rows and are analysed; more is 422.
MAX_MISSING_ROWS = 0.55
# The fewest bytes a real image of w x h pixels needs: deflate cannot beat ~1032:1 (PNG, per
# byte of raw pixels), a baseline JPEG spends at least a bit per 8x8 block.
PNG_MAX_RATIO = 1100
JPEG_MIN_BITS_PER_BLOCK = 1


@dataclass
class DecodedImage:
    pixels: np.ndarray  # float32 grey, original frame (after EXIF orientation for JPEG)
    source: str  # "dicom", "png" or "jpeg"
    filename: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    pixel_spacing: list[float] | None = None
    modality: str | None = None
    transfer_syntax: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


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


def refuse_without_anatomy(pixels: np.ndarray) -> None:
    """422 for a blank or near-uniform image: nothing there to call fractured or not."""
    sample = pixels[:: max(1, pixels.shape[0] // 256), :: max(1, pixels.shape[1] // 256)]
    lo, hi = np.percentile(sample, [1, 99])
    if hi - lo <= 1e-6 * max(1.0, float(np.abs(sample).max())):
        raise ApiError(
            422,
            "no_anatomy",
            "the image is blank or uniform (98% of its pixels share one value): nothing to analyse",
        )


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
            im.load()
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
            im = ImageOps.exif_transpose(im)
    except ApiError:
        raise
    except Exception as exc:
        raise ApiError(
            422,
            "undecodable_image",
            f"the {kind.upper()} file cannot be decoded ({type(exc).__name__})",
        ) from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(im, dtype=np.float32)
    elif im.mode in ("L", "1"):
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    else:
        # Colour (or palette, alpha): luminance; FracAtlas JPEGs are RGB with R = G = B.
        pixels = np.asarray(im.convert("RGB").convert("L"), dtype=np.float32)
    refuse_without_anatomy(pixels)
    return DecodedImage(pixels=pixels, source=kind, notes=notes)


def inflated_dataset_limit(max_pixels: int) -> int:
    """Most bytes a deflated dataset may inflate to: 16-bit pixels at the pixel limit plus 8 MiB
    of header; a deflate bomb stops there instead of filling memory."""
    return 2 * max_pixels + (8 << 20)


def _inflate_bounded(data: bytes, limit: int) -> bytes:
    """A Deflated Explicit VR Little Endian file rewritten as Explicit VR Little Endian, inflating
    at most `limit` bytes (413 past it); any other file is returned as it is."""
    import zlib

    # pydicom has no public reader of group 2 from a stream; this private one is stable in 3.x.
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    fp = io.BytesIO(data)
    try:
        if read_preamble(fp, force=True) is None:
            return data  # no preamble: not Part 10, pydicom's own reader decides below
        meta = _read_file_meta_info(fp)
    except Exception:
        return data
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return data
    body = data[fp.tell() :]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise ApiError(422, "invalid_dicom", "the deflated dataset cannot be inflated") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise ApiError(
            413,
            "image_too_large",
            f"the deflated dataset inflates past {limit} bytes, over the pixel limit",
        )
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    out.write(inflated)
    return out.getvalue()


def parse_dicom(data: bytes, max_pixels: int = 60_000_000) -> Dataset:
    """Part 10 bytes (or a bare dataset) -> pydicom Dataset; 422 when they are not DICOM.
    Deflated datasets are inflated within the pixel limit first (413 beyond)."""
    import pydicom

    data = _inflate_bounded(data, inflated_dataset_limit(max_pixels))
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise ApiError(
            422, "invalid_dicom", f"the DICOM file cannot be parsed ({type(exc).__name__})"
        ) from None


def decode_dicom(data: bytes, max_pixels: int, allowed_modalities: Sequence[str]) -> DecodedImage:
    return decode_dicom_dataset(parse_dicom(data, max_pixels), max_pixels, allowed_modalities)


def decode_dicom_dataset(
    ds: Dataset, max_pixels: int, allowed_modalities: Sequence[str]
) -> DecodedImage:
    import pydicom
    from pydicom.pixels import pixel_array
    from pydicom.uid import ImplicitVRLittleEndian

    if "PixelData" not in ds:
        raise ApiError(422, "no_pixel_data", "the DICOM object has no pixel data (not an image)")
    meta = ds.file_meta if hasattr(ds, "file_meta") else pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        # No file meta (e.g. raw implicit little endian from old modalities): the reader's guess.
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if ds.is_implicit_VR else pydicom.uid.ExplicitVRLittleEndian
        )
        ds.file_meta = meta
    ts = meta.TransferSyntaxUID
    ts_text = f"{ts.name} ({ts})" if ts.is_transfer_syntax else str(ts)
    modality = str(ds.get("Modality", "") or "").upper() or None
    if modality and modality not in {m.upper() for m in allowed_modalities}:
        raise ApiError(
            422,
            "unsupported_modality",
            f"modality {modality} is not a musculoskeletal radiograph; accepted: {', '.join(allowed_modalities)}",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ApiError(
            422,
            "multi_frame_unsupported",
            f"the object has {frames} frames; send single-frame radiographs (one instance per view)",
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols == 0:
        raise ApiError(422, "invalid_dicom", "the DICOM object has no Rows/Columns")
    if rows * cols > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"the image has {cols}x{rows} pixels, over the limit of {max_pixels}",
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        raise ApiError(422, "unsupported_photometric", "PALETTE COLOR images are not radiographs")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # pylibjpeg (libjpeg, openjpeg, rle) and pydicom's native paths only: Pillow's
            # decoders, with truncated images allowed for FracAtlas JPEGs, would turn a broken
            # JPEG 2000 stream into a blank image instead of an error.
            arr = pixel_array(ds, decoding_plugin="pylibjpeg")
    except Exception as exc:
        reason = type(exc).__name__
        raise ApiError(
            422,
            "undecodable_pixel_data",
            f"pixel data in transfer syntax {ts_text} cannot be decoded ({reason})",
        ) from None
    if arr.ndim == 3 and photometric.startswith(("RGB", "YBR")):
        arr = arr.astype(np.float32).mean(axis=2)
    if arr.ndim != 2 or arr.shape != (rows, cols):
        raise ApiError(
            422, "invalid_dicom", f"decoded pixels have shape {arr.shape}, expected {rows}x{cols}"
        )
    pixels, notes = _to_presentation(ds, arr, photometric)
    if not np.isfinite(pixels).all():
        raise ApiError(422, "invalid_dicom", "decoded pixel values are not finite")
    refuse_without_anatomy(pixels)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return DecodedImage(
        pixels=pixels,
        source="dicom",
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        pixel_spacing=[float(v) for v in spacing] if spacing else None,
        modality=modality,
        transfer_syntax=str(ts),
        notes=notes,
    )


def _uid(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None


def _to_presentation(ds, arr: np.ndarray, photometric: str) -> tuple[np.ndarray, list[str]]:
    """Stored values -> presentation values: bits stored, modality LUT, VOI, MONOCHROME1."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    notes: list[str] = []
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if (
        not signed
        and 0 < bits_stored < arr.dtype.itemsize * 8
        and np.issubdtype(arr.dtype, np.integer)
    ):
        # Overlays or junk in the unused high bits must not become pixel values.
        arr = arr & np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            values = apply_modality_lut(arr, ds)
        except Exception:
            values = arr
            notes.append("modality LUT ignored: it cannot be applied")
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            try:
                windowed = apply_voi_lut(values, ds, index=0)
            except Exception:
                windowed = None
                notes.append("VOI LUT ignored: it cannot be applied")
            if windowed is not None:
                if _saturated(windowed) and not _saturated(values):
                    # A window outside the stored values makes a blank image; grey stretching
                    # of the modality values is the better presentation.
                    notes.append("VOI window ignored: it saturates the image")
                else:
                    values = windowed
    values = np.asarray(values, dtype=np.float32)
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values, notes


def _saturated(values: np.ndarray) -> bool:
    """True when almost every pixel sits at the minimum or the maximum."""
    v = np.asarray(values)[::4, ::4]
    lo, hi = v.min(), v.max()
    if hi <= lo:
        return True
    return float(np.mean((v > lo) & (v < hi))) < 0.01
