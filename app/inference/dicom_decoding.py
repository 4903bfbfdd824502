"""DICOM uploads -> DecodedImage (pydicom 3 + pylibjpeg, the faster imagecodecs decoders where they
give the same samples): parsing with bounded inflation of deflated files, the modality LUT
(rescale), the VOI LUT or window, MONOCHROME1 inverted, bits above BitsStored masked, JPEG 2000
decoded at the working resolution. Policy: multi-frame objects and modalities outside
`allowed_modalities` (e.g. MG) are refused with 422, never guessed at. Patient identifiers are
never read into the result (a digest of PatientID tells two patients apart), so they cannot
reach a log or an answer."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from app.core.errors import ApiError
from app.inference.images import (
    LENIENT_PILLOW_LOCK,
    DecodedImage,
    reduction,
    refuse_without_anatomy,
    working_image,
)


def inflated_dataset_limit(max_pixels: int) -> int:
    """Most bytes a deflated dataset may inflate to: 16-bit pixels at the pixel limit plus 8 MiB
    of header; a deflate bomb stops there instead of filling memory."""
    return 2 * max_pixels + (8 << 20)


INFLATE_PIECE = 4 << 20


def _inflated_size(body: bytes, limit: int) -> int:
    """How many bytes a raw deflate stream inflates to, counted piece by piece and stopping
    past `limit` (zlib.error for a broken stream)."""
    import zlib

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, rest = 0, body
    while rest and total <= limit:
        total += len(inflater.decompress(rest, INFLATE_PIECE))
        rest = inflater.unconsumed_tail
    return total + (len(inflater.flush()) if total <= limit else 0)


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
    try:
        # measured first in small pieces that are thrown away: a bomb is refused without ever
        # holding what it inflates to (the service's peak memory stays where it was)
        if _inflated_size(body, limit) > limit:
            raise ApiError(
                413,
                "image_too_large",
                f"the deflated dataset inflates past {limit} bytes, over the pixel limit",
            )
        inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
    except zlib.error:
        raise ApiError(422, "invalid_dicom", "the deflated dataset cannot be inflated") from None
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
    k = reduction(rows, cols)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        raise ApiError(422, "unsupported_photometric", "PALETTE COLOR images are not radiographs")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # pylibjpeg (libjpeg, openjpeg, rle) and pydicom's native paths only: Pillow's
            # decoders, with truncated images allowed for FracAtlas JPEGs, would turn a broken
            # JPEG 2000 stream into a blank image instead of an error.
            arr = _fast_decode(ds, rows, cols, k)
            if arr is None:
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
    reduced = (
        arr.ndim == 2 and abs(arr.shape[0] * k - rows) <= k and abs(arr.shape[1] * k - cols) <= k
    )
    if arr.ndim != 2 or not (arr.shape == (rows, cols) or reduced):
        raise ApiError(
            422, "invalid_dicom", f"decoded pixels have shape {arr.shape}, expected {rows}x{cols}"
        )
    pixels, notes = _to_presentation(ds, arr, photometric)
    pixels, frame_size = working_image(pixels, (rows, cols))
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
        patient_key=_patient_key(ds),
        pixel_spacing=[float(v) for v in spacing] if spacing else None,
        modality=modality,
        body_part=_body_part(ds),
        transfer_syntax=str(ts),
        notes=notes,
        frame_size=frame_size,
    )


def _body_part(ds: Dataset) -> str | None:
    named = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if named:
        return named
    for item in ds.get("AnatomicRegionSequence", []) or []:
        meaning = str(item.get("CodeMeaning", "") or "").strip().upper()
        if meaning:
            return meaning
    return None


def _patient_key(ds: Dataset) -> str | None:
    patient = str(ds.get("PatientID", "") or "").strip()
    return hashlib.sha256(patient.encode()).hexdigest()[:16] if patient else None


J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


# Faster codecs (imagecodecs) for the syntaxes whose grey frames they decode to exactly
# pylibjpeg's samples (tested on the shared files): CharLS for JPEG-LS (4x faster at 1760x1760),
# lossless JPEG (3x). Lossy 8/12-bit JPEG is not here: another IDCT gives other samples.
IMAGECODECS_DECODERS = {
    "1.2.840.10008.1.2.4.80": "jpegls_decode",
    "1.2.840.10008.1.2.4.81": "jpegls_decode",
    "1.2.840.10008.1.2.4.57": "ljpeg_decode",
    "1.2.840.10008.1.2.4.70": "ljpeg_decode",
}


# Decoder threads for one full-size JPEG 2000 frame (OpenJPEG splits the code-blocks).
J2K_THREADS = min(4, os.cpu_count() or 1)


def _fast_decode(ds: Dataset, rows: int, cols: int, k: int) -> np.ndarray | None:
    """The stored values of a grey frame from a faster decoder than pylibjpeg where one takes
    it: JPEG 2000 reduced by k when large, else in full with threads; JPEG-LS and lossless JPEG
    by imagecodecs. None where none applies or it fails: pylibjpeg decodes (and reports) it."""
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts in J2K_SYNTAXES:
        codestream = _grey_j2k_codestream(ds)
        if codestream is None:
            return None
        arr = _j2k_reduced(codestream, k) if k > 1 else None
        return arr if arr is not None else _j2k_threaded(codestream[0], rows, cols)
    decoder = IMAGECODECS_DECODERS.get(ts)
    if decoder is None or int(ds.get("PixelRepresentation", 0) or 0) != 0:
        return None
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    frame = _single_frame(ds)
    if frame is None:
        return None
    try:
        import imagecodecs

        arr = getattr(imagecodecs, decoder)(frame)
    except Exception:
        return None
    if arr.shape != (rows, cols) or arr.dtype not in (np.uint8, np.uint16):
        return None
    # pydicom's dtype follows Bits Allocated, the codec's the precision
    return arr.astype(np.uint16 if int(ds.get("BitsAllocated", 8)) > 8 else np.uint8, copy=False)


def _single_frame(ds: Dataset) -> bytes | None:
    """The one encapsulated frame of a single-frame object, or None."""
    from pydicom.encaps import generate_frames

    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:
        return None


def _grey_j2k_codestream(ds: Dataset) -> tuple[bytes, int] | None:
    """(frame, precision) of a JPEG 2000 object (J2K_SYNTAXES) whose frame is a raw codestream of
    one unsigned component of at most 16 bits, the only kind the fast decoders below take; else
    None."""
    frame = _single_frame(ds)
    # raw codestream: SOC, SIZ; one component (Csiz at 40), Ssiz at 42: sign bit + precision - 1
    if frame is None or frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 43:
        return None
    if frame[40:42] != b"\x00\x01":
        return None
    precision, signed = (frame[42] & 0x7F) + 1, frame[42] >> 7
    if signed or precision > 16:
        return None
    # DICOM pads an odd-length fragment with one NULL after the EOC marker; Pillow's OpenJPEG
    # then calls the stream broken and the frame was decoded in full (248 ms instead of 85)
    if frame.endswith(b"\xff\xd9\x00"):
        frame = frame[:-1]
    return frame, precision


def _j2k_threaded(frame: bytes, rows: int, cols: int) -> np.ndarray | None:
    """A full-size grey JPEG 2000 codestream decoded by OpenJPEG with J2K_THREADS threads
    (imagecodecs): the same library as pylibjpeg's, so the same samples (tested on the shared
    files); None where it does not apply or fails, and pylibjpeg decodes (and reports) it."""
    if J2K_THREADS < 2:
        return None
    try:
        import imagecodecs

        arr = imagecodecs.jpeg2k_decode(frame, numthreads=J2K_THREADS)
    except Exception:
        return None
    if arr.shape != (rows, cols) or arr.dtype not in (np.uint8, np.uint16):
        return None
    return arr


def _j2k_reduced(codestream: tuple[bytes, int], k: int) -> np.ndarray | None:
    """A grey JPEG 2000 codestream (_grey_j2k_codestream) decoded k = 2^r times smaller by
    skipping its finest wavelet levels (Pillow's OpenJPEG; 4x faster at 2500x2048); None where
    Pillow fails, and the caller decodes in full. Pillow scales samples to 16 bits: shifted back
    here."""
    frame, precision = codestream
    try:
        with LENIENT_PILLOW_LOCK:  # strict: a broken stream raises here
            im = Image.open(io.BytesIO(frame))
            im.reduce = k.bit_length() - 1  # resolution levels to skip
            im.load()
    except Exception:
        return None
    if im.mode != "I;16":
        return None
    return np.asarray(im).astype(np.uint16) >> (16 - precision)


def _uid(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None


def _to_presentation(ds, arr: np.ndarray, photometric: str) -> tuple[np.ndarray, list[str]]:
    """Stored values -> presentation values: bits stored, modality LUT, VOI, MONOCHROME1.

    pydicom's LUT functions work value by value, so an integer frame goes through a table of its
    value range: the same functions applied once per stored value, then looked up per pixel
    (identical values, 5x faster than float64 arithmetic over a few million pixels)."""
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
    index = None  # pixel -> row of the table, when the frame goes through one
    if arr.ndim == 2 and arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        lo, hi = int(arr.min()), int(arr.max())
        index = arr if lo == 0 else arr.astype(np.int32) - lo
        arr = np.arange(lo, hi + 1).astype(arr.dtype)

    def sample(values: np.ndarray) -> np.ndarray:
        return values[index[::4, ::4]] if index is not None else values[::4, ::4]

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
                if _saturated(sample(windowed)) and not _saturated(sample(values)):
                    # A window outside the stored values makes a blank image; grey stretching
                    # of the modality values is the better presentation.
                    notes.append("VOI window ignored: it saturates the image")
                else:
                    values = windowed
    values = np.asarray(values, dtype=np.float32)
    if index is not None:
        values = values[index]
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values, notes


def _saturated(v: np.ndarray) -> bool:
    """True when almost every pixel of a sample (every 4th row and column) sits at the minimum
    or the maximum."""
    v = np.asarray(v)
    lo, hi = v.min(), v.max()
    if hi <= lo:
        return True
    return float(np.mean((v > lo) & (v < hi))) < 0.01
