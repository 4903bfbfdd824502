"""Broken and hostile images: never a silent answer, never a 5xx, refused before work is spent
where the bytes cannot hold what the header claims."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.inference.decoding import MAX_MISSING_ROWS
from tests.conftest import bone_phantom, png_bytes
from tests.dicom_factory import make_dataset, to_bytes


def post(client, data: bytes, ctype: str):
    return client.post("/v1/predict", content=data, headers={"content-type": ctype})


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.9, 0.97])
def test_a_truncated_jpeg_is_never_silent(app_client, keep):
    data = jpeg_bytes(bone_phantom(600, 480))
    r = post(app_client, data[: int(len(data) * keep)], "image/jpeg")
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert r.json()["error"] == "truncated_image"
        assert keep <= 0.5
    else:
        notes = r.json()["images"][0]["notes"]
        assert any("truncated" in n for n in notes), notes


def test_a_truncated_png_is_never_silent(app_client):
    data = png_bytes(bone_phantom(300, 240))
    for keep in (0.2, 0.6, 0.95):
        r = post(app_client, data[: int(len(data) * keep)], "image/png")
        assert r.status_code in (200, 422), r.text
        if r.status_code == 200:
            assert any("truncated" in n for n in r.json()["images"][0]["notes"])


def test_fracatlas_truncated_jpegs_are_analysed_with_a_note(app_client, fracatlas_dir):
    """The release's own truncated files (IMG0004028.. lose up to half their rows) still get an
    answer, and the answer says what was missing."""
    truncated = []
    for path in sorted((fracatlas_dir / "images" / "Non_fractured").glob("IMG00040*.jpg")):
        data = path.read_bytes()
        if b"\xff\xd9" not in data[-64:]:
            truncated.append(data)
    assert truncated
    for data in truncated[:6]:
        r = post(app_client, data, "image/jpeg")
        assert r.status_code == 200, r.text
        assert any("truncated" in n for n in r.json()["images"][0]["notes"])
    assert MAX_MISSING_ROWS >= 0.51


def test_header_dimensions_the_bytes_cannot_fill_are_refused_before_decoding(app_client):
    # a PNG header claiming 7000 x 8000 grey pixels, one tiny IDAT
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 7000, 8000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )
    r = post(app_client, png, "image/png")
    assert r.status_code == 422 and r.json()["error"] == "dimensions_exceed_data", r.text
    # a JPEG whose SOF claims 7000 x 8000: the 64x64 image's frame header rewritten
    small = bytearray(jpeg_bytes(bone_phantom(64, 64)))
    sof = small.index(b"\xff\xc0")
    small[sof + 5 : sof + 9] = struct.pack(">HH", 8000, 7000)
    r = post(app_client, bytes(small), "image/jpeg")
    assert r.status_code == 422 and r.json()["error"] == "dimensions_exceed_data", r.text


@pytest.mark.parametrize("value", [0, 128, 255])
def test_a_blank_image_is_refused(app_client, value):
    r = post(app_client, png_bytes(np.full((200, 160), value, np.uint8)), "image/png")
    assert r.status_code == 422 and r.json()["error"] == "no_anatomy"


def test_a_blank_dicom_is_refused(app_client):
    ds = make_dataset(np.full((64, 64), 700, np.uint16), bits_stored=12)
    r = post(app_client, to_bytes(ds), "application/dicom")
    assert r.status_code == 422 and r.json()["error"] == "no_anatomy"


def test_a_deflate_bomb_is_stopped_at_the_pixel_limit():
    """A deflated DICOM whose dataset inflates to 200 MB is refused after inflating no more than
    the pixel limit allows; a normal deflated file decodes."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from app.core.errors import ApiError
    from app.inference.decoding import decode, inflated_dataset_limit

    ds = make_dataset(bone_phantom(64, 64).astype(np.uint16) * 8, bits_stored=12, modality="DX")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    image = decode(to_bytes(ds), "application/dicom", None, 1_000_000, ["DX"])
    assert image.width == 64
    ds.add_new(0x00091010, "OB", b"\0" * 200_000_000)
    bomb = to_bytes(ds)
    assert len(bomb) < 500_000
    with pytest.raises(ApiError) as err:
        decode(bomb, "application/dicom", None, 1_000_000, ["DX"])
    assert err.value.status == 413 and str(inflated_dataset_limit(1_000_000)) in err.value.detail


def test_stow_without_a_study_uid_is_refused_before_inference(app_client):
    from app.dicom.multipart import build_related

    ds = make_dataset(bone_phantom(96, 80).astype(np.uint16) * 8, bits_stored=12)
    del ds.StudyInstanceUID
    body, ctype = build_related([to_bytes(ds)])
    r = app_client.post(
        "/dicomweb/studies",
        content=body,
        headers={"content-type": ctype, "accept": "application/dicom+json"},
    )
    assert r.status_code == 409, r.text
    failed = r.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xA900]


def test_head_on_the_probes(app_client):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert app_client.head(path).status_code == 200, path


def test_a_hundred_parts_is_413_as_documented(app_client):
    small = png_bytes(bone_phantom(64, 64))
    files = [("files", (f"{i}.png", small, "image/png")) for i in range(100)]
    r = app_client.post("/v1/predict", files=files)
    assert r.status_code == 413 and r.json()["error"] == "too_many_images", r.text
