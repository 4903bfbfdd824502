"""Decoding of real and test-written DICOM, PNG and JPEG files, and every refusal."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from app.core.errors import ApiError
from app.inference import decoding, dicom_decoding, images
from app.inference.decoding import decode, reduction
from tests.conftest import bone_phantom, png_bytes
from tests.dicom_factory import make_dataset, to_bytes

LIMIT = 60_000_000
MODALITIES = ("CR", "DX", "RG")
LOSSLESS_RG3 = ("RG3_UNC.dcm", "RG3_JPLL.dcm", "RG3_JLSL.dcm", "RG3_J2KR.dcm", "RG3_RLE.dcm")


def dec(data: bytes, ctype: str = "application/dicom", limit: int = LIMIT):
    return decode(data, ctype, "x", limit, MODALITIES)


def ramp(rows: int = 64, cols: int = 48, bits: int = 12) -> np.ndarray:
    return (np.arange(rows * cols).reshape(rows, cols) * 7 % (1 << bits)).astype(np.uint16)


# --- the shared, real files ------------------------------------------------------------------


def test_every_shared_dicom_decodes_or_is_refused_as_the_manifest_says(dicom_dir, dicom_manifest):
    for row in dicom_manifest:
        data = (dicom_dir / row["file"]).read_bytes()
        if row["modality"] == "MG":
            with pytest.raises(ApiError) as err:
                dec(data)
            assert err.value.status == 422 and err.value.code == "unsupported_modality"
        elif row["decodes_with_pydicom3_pylibjpeg"] == "ok":
            image = dec(data)
            rows, cols = (int(v) for v in row["rows_x_cols"].split("x"))
            assert (image.height, image.width) == (rows, cols), row["file"]
            k = reduction(rows, cols)  # the working image: 2^k times smaller when large
            assert image.pixels.shape == (-(-rows // k), -(-cols // k)), row["file"]
            assert image.pixels.std() > 0, f"{row['file']} decoded to a blank image"
        else:
            with pytest.raises(ApiError) as err:
                dec(data)
            assert err.value.status == 422
            assert row["ts_uid"] in err.value.detail  # the message names the transfer syntax


def dec_full(data: bytes, monkeypatch) -> np.ndarray:
    """The whole frame's presentation values (no working-size reduction)."""
    with monkeypatch.context() as m:
        m.setattr(images, "WORKING_SIDE", 10**6)
        return dec(data).pixels


def test_lossless_rg3_variants_give_identical_pixels(dicom_dir, monkeypatch):
    """Identical frames; at the working size too, except JPEG 2000, whose wavelet low band
    stands in for the box reduce (within 1% of the range on average)."""
    reference = dec_full((dicom_dir / LOSSLESS_RG3[0]).read_bytes(), monkeypatch)
    working = dec((dicom_dir / LOSSLESS_RG3[0]).read_bytes()).pixels
    for name in LOSSLESS_RG3[1:]:
        data = (dicom_dir / name).read_bytes()
        assert np.array_equal(dec_full(data, monkeypatch), reference), name
        if name == "RG3_J2KR.dcm":
            span = float(working.max() - working.min())
            assert np.abs(dec(data).pixels - working).mean() <= 0.01 * span
        else:
            assert np.array_equal(dec(data).pixels, working), name


def test_monochrome1_is_inverted_so_bone_is_bright(dicom_dir, monkeypatch):
    # RG3 is MONOCHROME1 (a lower leg): after inversion the tibial shaft is brighter than the
    # air between the collimator edge and the leg.
    img = dec_full((dicom_dir / "RG3_UNC.dcm").read_bytes(), monkeypatch)
    assert np.median(img[400:800, 820:900]) > np.median(img[400:800, 480:540]) + 200


def test_file_without_meta_is_accepted(dicom_dir):
    image = dec((dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes())
    assert image.pixels.shape == (440, 440)


def test_window_that_saturates_is_ignored_and_said(dicom_dir):
    image = dec((dicom_dir / "JPEG2KLossless_1s_1f_u_16_16.dcm").read_bytes())
    assert image.pixels.std() > 0
    assert any("window ignored" in n for n in image.notes)


# --- DICOMs written here ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda u: u.name
)
def test_compressed_syntaxes_round_trip_exactly(syntax):
    pixels = ramp(bits=12)
    ds = make_dataset(pixels, bits_stored=12)
    ds.compress(syntax)
    assert np.array_equal(dec(to_bytes(ds)).pixels, pixels.astype(np.float32))


def test_uncompressed_16_bit_and_bits_stored_masking():
    pixels = ramp(bits=10)
    junk = pixels | np.uint16(0xF000)  # overlay bits above BitsStored
    image = dec(to_bytes(make_dataset(junk, bits_stored=10)))
    assert np.array_equal(image.pixels, pixels.astype(np.float32))
    full = (np.arange(64 * 48).reshape(64, 48) * 997 % 65536).astype(np.uint16)
    assert np.array_equal(
        dec(to_bytes(make_dataset(full, bits_stored=16))).pixels, full.astype(np.float32)
    )


def test_monochrome1_written_here_is_inverted():
    pixels = ramp(bits=12)
    mono1 = dec(to_bytes(make_dataset(pixels, bits_stored=12, photometric="MONOCHROME1"))).pixels
    mono2 = dec(to_bytes(make_dataset(pixels, bits_stored=12))).pixels
    assert np.allclose(mono1, mono2.max() + mono2.min() - mono2)


def test_rescale_and_window_are_applied():
    pixels = ramp(bits=12)
    image = dec(to_bytes(make_dataset(pixels, bits_stored=12, rescale=(2.0, -100.0))))
    assert np.allclose(image.pixels, pixels * 2.0 - 100.0)
    windowed = dec(to_bytes(make_dataset(pixels, bits_stored=12, window=(1000, 400)))).pixels
    inside = (pixels > 850) & (pixels < 1150)
    assert windowed[pixels <= 700].max() == windowed.min()  # below the window: the floor
    assert np.corrcoef(windowed[inside], pixels[inside])[0, 1] > 0.99  # linear inside


def test_no_meta_written_here_is_accepted():
    pixels = ramp()
    image = dec(to_bytes(make_dataset(pixels, bits_stored=12), with_meta=False))
    assert np.array_equal(image.pixels, pixels.astype(np.float32))


def test_multi_frame_is_refused_with_422():
    frames = np.stack([ramp(), ramp()])
    with pytest.raises(ApiError) as err:
        dec(to_bytes(make_dataset(frames, bits_stored=12, frames=2)))
    assert err.value.status == 422 and err.value.code == "multi_frame_unsupported"


def test_other_modality_is_refused_with_422():
    with pytest.raises(ApiError) as err:
        dec(to_bytes(make_dataset(ramp(), bits_stored=12, modality="MG")))
    assert err.value.status == 422 and "MG" in err.value.detail


def test_metadata_is_read_and_identifiers_are_not():
    ds = make_dataset(ramp(), bits_stored=12)
    image = dec(to_bytes(ds))
    assert image.sop_instance_uid == ds.SOPInstanceUID
    assert image.study_instance_uid == ds.StudyInstanceUID
    assert image.pixel_spacing == [0.15, 0.15]
    assert "Secret" not in repr(image.__dict__.keys()) and not hasattr(image, "patient_name")


def test_pixel_limit_is_checked_before_decoding_dicom():
    with pytest.raises(ApiError) as err:
        decode(
            to_bytes(make_dataset(ramp(), bits_stored=12)),
            "application/dicom",
            "x",
            1000,
            MODALITIES,
        )
    assert err.value.status == 413


# --- PNG and JPEG -------------------------------------------------------------------------------


def test_png_8_and_16_bit_grey_and_rgb():
    grey = bone_phantom(60, 80)
    assert np.array_equal(dec(png_bytes(grey), "image/png").pixels, grey.astype(np.float32))
    deep = (grey.astype(np.uint16) * 257).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    assert dec(buf.getvalue(), "image/png").pixels.max() == deep.max()
    rgb = np.stack([grey] * 3, axis=-1)
    assert np.allclose(dec(png_bytes(rgb), "image/png").pixels, grey, atol=1)


def test_jpeg_exif_orientation_is_applied():
    img = Image.fromarray(bone_phantom(60, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert dec(buf.getvalue(), "image/jpeg").pixels.shape == (100, 60)


def test_truncated_fracatlas_jpeg_decodes(fracatlas_dir):
    path = fracatlas_dir / "images" / "Non_fractured" / "IMG0004028.jpg"
    if not path.exists():
        pytest.skip("IMG0004028.jpg not in this copy")
    with Image.open(path) as im:
        size = im.size
    assert dec(path.read_bytes(), "image/jpeg").pixels.shape == (size[1], size[0])


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_413_before_decoding():
    with pytest.raises(ApiError) as err:
        dec(_png_header_only(100_000, 100_000), "image/png")
    assert err.value.status == 413


def test_unknown_type_is_415_and_garbage_image_is_422_and_empty_is_400():
    with pytest.raises(ApiError) as err:
        dec(b"hello world", "text/plain")
    assert err.value.status == 415
    with pytest.raises(ApiError) as err:
        dec(b"\x89PNG\r\n\x1a\nbroken", "image/png")
    assert err.value.status == 422
    with pytest.raises(ApiError) as err:
        dec(b"", "image/png")
    assert err.value.status == 400
    with pytest.raises(ApiError) as err:
        dec(b"\x00" * 300, "application/dicom")
    assert err.value.status == 422


def test_padded_jpeg2000_fragment_is_decoded_at_the_working_size(dicom_dir, monkeypatch):
    """JPEG2KLossless_1s_1f_u_16_16's fragment ends with DICOM's NULL pad after the EOC marker:
    it is still decoded by skipping wavelet levels (not in full), close to the full frame's box
    reduce (within 1% of the range on average)."""
    import pydicom

    path = dicom_dir / "JPEG2KLossless_1s_1f_u_16_16.dcm"
    ds = pydicom.dcmread(path)
    codestream = dicom_decoding._grey_j2k_codestream(ds)
    assert codestream is not None and codestream[0].endswith(b"\xff\xd9")
    assert dicom_decoding._j2k_reduced(codestream, 2) is not None
    working = dec(path.read_bytes()).pixels
    full = dec_full(path.read_bytes(), monkeypatch)
    boxed = decoding.reduce_pixels(full.astype(np.float32), 2)
    assert working.shape == boxed.shape
    span = float(boxed.max() - boxed.min())
    assert np.abs(working.astype(np.float32) - boxed).mean() <= 0.01 * span
