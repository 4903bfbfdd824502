"""Hostile inputs, built here (nothing large committed), against /v1/predict and STOW-RS of the
real app: every one gets a clear answer below 500 (a JSON error with a code and a detail, or a
DICOM response saying which instances failed), and the service keeps serving.

Each case is (name, method path, headers, body, allowed statuses).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from app.core.config import Settings
from app.dicom.multipart import build_related
from tests.conftest import bone_phantom, png_bytes
from tests.dicom_factory import make_dataset, to_bytes

PREDICT = "/v1/predict"
STOW = "/dicomweb/studies"
REFUSED = {400, 413, 415, 422}
ANALYSED_OR_REFUSED = {200} | REFUSED

Case = tuple[str, str, dict[str, str], bytes, set[int]]


def phantom(h: int = 200, w: int = 160) -> np.ndarray:
    return bone_phantom(h, w)


def jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def image_as(mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(phantom()).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def png_with_size(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


def flipped(data: bytes, start: float, length: int = 64) -> bytes:
    i = int(len(data) * start)
    return data[:i] + bytes(b ^ 0xFF for b in data[i : i + length]) + data[i + length :]


def dicom(mutate: Callable | None = None, **kw) -> bytes:
    ds = make_dataset(phantom().astype(np.uint16) * 8, bits_stored=12, **kw)
    if mutate is not None:
        mutate(ds)
    return to_bytes(ds)


def drop(*keywords: str) -> Callable:
    def mutate(ds) -> None:
        for k in keywords:
            if k in ds:
                delattr(ds, k)

    return mutate


def setting(**values) -> Callable:
    def mutate(ds) -> None:
        for k, v in values.items():
            setattr(ds, k, v)

    return mutate


def form(
    parts: list[tuple[str, str, bytes, str]], boundary: str = "b0undaryXYZ"
) -> tuple[dict, bytes]:
    """multipart/form-data with parts (disposition params, content type, body, name)."""
    out = b""
    for disposition, ctype, body, _ in parts:
        out += f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + body + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, out


def raw(name: str, ctype: str | None, body: bytes, allowed: set[int], path: str = PREDICT) -> Case:
    return (name, path, {"content-type": ctype} if ctype else {}, body, allowed)


def stow(name: str, instances: list[bytes], allowed: set[int], path: str = STOW) -> Case:
    body, ctype = build_related(instances)
    return (name, path, {"content-type": ctype}, body, allowed)


def cases() -> list[Case]:
    good_png = png_bytes(phantom())
    good_jpeg = jpeg(phantom())
    good_dcm = dicom()
    out: list[Case] = []
    # --- raw bodies: types, sniffing, garbage
    out += [
        raw("empty png", "image/png", b"", {400}),
        raw("empty, no type", None, b"", {400}),
        raw("text", "text/plain", b"hello", {415}),
        raw("json", "application/json", b'{"a": 1}', {415}),
        raw("html", "text/html", b"<html></html>", {415}),
        raw("zeros as png", "image/png", b"\0" * 4096, {422}),
        raw("random as jpeg", "image/jpeg", bytes(range(256)) * 16, {422}),
        raw("random as dicom", "application/dicom", bytes(range(256)) * 16, {422}),
        raw("random octets", "application/octet-stream", bytes(range(256)) * 16, {415}),
        raw("png declared jpeg", "image/jpeg", good_png, {200}),
        raw("jpeg declared dicom", "application/dicom", good_jpeg, {200}),
        raw("png without type", None, good_png, {200}),
        raw("png upper-case type", "IMAGE/PNG", good_png, {200}),
        raw("png with charset", "image/png; charset=utf-8", good_png, {200}),
        raw("magic only png", "image/png", b"\x89PNG\r\n\x1a\n", {422}),
        raw("magic only jpeg", "image/jpeg", b"\xff\xd8\xff", {422}),
        raw("DICM only", "application/dicom", b"\0" * 128 + b"DICM", {422}),
    ]
    # --- raster formats and shapes
    for mode, fmt, allowed in [
        ("RGBA", "PNG", {200}),
        ("LA", "PNG", {200}),
        ("P", "PNG", {200}),
        ("I;16", "PNG", {200}),
        ("1", "PNG", ANALYSED_OR_REFUSED),  # dithered to black and white: no radiograph left
        ("CMYK", "JPEG", {200}),
        ("L", "JPEG", {200}),
        ("L", "GIF", {415, 422}),
        ("L", "BMP", {415, 422}),
        ("L", "TIFF", {415, 422}),
        ("L", "WEBP", {415, 422}),
    ]:
        out.append(raw(f"{mode} {fmt}", f"image/{fmt.lower()}", image_as(mode, fmt), allowed))
    out.append(raw("progressive jpeg", "image/jpeg", jpeg(phantom(), progressive=True), {200}))
    for h, w in [(1, 1), (2, 2), (1, 3000), (3000, 1), (8, 8)]:
        arr = np.random.default_rng(h * w).integers(0, 255, (h, w), dtype=np.uint8)
        out.append(raw(f"png {h}x{w}", "image/png", png_bytes(arr), ANALYSED_OR_REFUSED))
    out.append(raw("uniform png", "image/png", png_bytes(np.full((300, 200), 77, np.uint8)), {422}))
    for w, h in [(7000, 8000), (60000, 60000), (1, 10**6)]:
        out.append(raw(f"png claims {w}x{h}", "image/png", png_with_size(w, h), {413, 422}))
    # --- truncation and corruption
    for share in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        out.append(
            raw(
                f"png cut {share}",
                "image/png",
                good_png[: int(len(good_png) * share)],
                ANALYSED_OR_REFUSED,
            )
        )
        out.append(
            raw(
                f"jpeg cut {share}",
                "image/jpeg",
                good_jpeg[: int(len(good_jpeg) * share)],
                ANALYSED_OR_REFUSED,
            )
        )
    for where in (0.2, 0.5, 0.8):
        out.append(
            raw(
                f"png flipped at {where}",
                "image/png",
                flipped(good_png, where),
                ANALYSED_OR_REFUSED,
            )
        )
        out.append(
            raw(
                f"jpeg flipped at {where}",
                "image/jpeg",
                flipped(good_jpeg, where),
                ANALYSED_OR_REFUSED,
            )
        )
    out.append(raw("jpeg twice", "image/jpeg", good_jpeg + good_jpeg, ANALYSED_OR_REFUSED))
    out.append(
        raw("png with trailing junk", "image/png", good_png + b"junk" * 100, ANALYSED_OR_REFUSED)
    )
    # --- DICOM objects
    dicoms = {
        "no pixel data": dicom(drop("PixelData")),
        "no rows": dicom(drop("Rows")),
        "rows zero": dicom(setting(Rows=0)),
        "pixel data short": dicom(setting(PixelData=b"\0\1" * 10)),
        "pixel data odd length": dicom(setting(PixelData=b"\0" * 101)),
        "bits allocated 12": dicom(setting(BitsAllocated=12)),
        "bits stored 0": dicom(setting(BitsStored=0)),
        "samples 3 on grey data": dicom(setting(SamplesPerPixel=3)),
        "palette colour": dicom(photometric="PALETTE COLOR"),
        "monochrome1": dicom(photometric="MONOCHROME1"),
        "mammogram": dicom(modality="MG"),
        "ct": dicom(modality="CT"),
        "no modality": dicom(drop("Modality")),
        "multi-frame": to_bytes(
            make_dataset(np.stack([phantom().astype(np.uint16)] * 2), bits_stored=12, frames=2)
        ),
        "claims 60000x60000": dicom(setting(Rows=60000, Columns=60000)),
        "window outside values": dicom(window=(100000.0, 10.0)),
        "rescale slope zero": dicom(rescale=(0.0, 5.0)),
        "no sop uid": dicom(drop("SOPInstanceUID")),
        "no study uid": dicom(drop("StudyInstanceUID")),
        "no meta": to_bytes(
            make_dataset(phantom().astype(np.uint16), bits_stored=12), with_meta=False
        ),
        "preamble then garbage": b"\0" * 128 + b"DICM" + bytes(range(256)) * 4,
        "cut in half": good_dcm[: len(good_dcm) // 2],
        "cut in header": good_dcm[:200],
    }
    for name, data in dicoms.items():
        out.append(raw(f"dicom {name}", "application/dicom", data, ANALYSED_OR_REFUSED))
    # --- multipart uploads
    h, b = form([('name="files"; filename="a.png"', "image/png", good_png, "")])
    out.append((("form one file"), PREDICT, h, b, {200}))
    h, b = form([("name=\"files\"; filename*=UTF-8''r%C3%B6ntgen.png", "image/png", good_png, "")])
    out.append(("form filename*", PREDICT, h, b, {200}))
    h, b = form([('name="other"', "", b"x", "")])
    out.append(("form without files", PREDICT, h, b, {400}))
    h, b = form([('name="files"; filename="a.png"', "image/png", b"", "")])
    out.append(("form empty file", PREDICT, h, b, {400}))
    too_many = Settings().max_images_per_request + 1
    h, b = form([('name="files"; filename="a.png"', "image/png", good_png, "")] * too_many)
    out.append(("form one file past the limit", PREDICT, h, b, {413}))
    h, b = form([('name="note"', "", b"x", "")] * 150)
    out.append(("form 150 fields", PREDICT, h, b, {413}))
    h, b = form(
        [
            ('name="files"; filename="a.png"', "image/png", good_png, ""),
            ('name="files"; filename="b.txt"', "text/plain", b"hi", ""),
        ]
    )
    # the PNG is analysed, the text file answered as not analysed (415) beside it
    out.append(("form with a text file", PREDICT, h, b, {200}))
    out += [
        (
            ("form no boundary"),
            PREDICT,
            {"content-type": "multipart/form-data"},
            b"--x\r\n\r\n--x--",
            {400},
        ),
        (
            "form unclosed",
            PREDICT,
            {"content-type": "multipart/form-data; boundary=zz"},
            b'--zz\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\nabc',
            {400},
        ),
        (
            "form garbage",
            PREDICT,
            {"content-type": "multipart/form-data; boundary=zz"},
            bytes(range(256)),
            {400},
        ),
        (
            "multipart mixed",
            PREDICT,
            {"content-type": "multipart/mixed; boundary=zz"},
            b"--zz--",
            {415},
        ),
    ]
    # --- query parameters
    for query in (
        "fp_per_image=-1",
        "fp_per_image=0",
        "fp_per_image=0.05",
        "fp_per_image=0.6",
        "fp_per_image=abc",
        "fp_per_image=nan",
        "fp_per_image=inf",
        "fp_per_image=1e309",
        "score_threshold=-0.1",
        "score_threshold=1.5",
        "score_threshold=nan",
        "classifier=nope",
        "detector=nope",
        "classifier=" + "x" * 5000,
    ):
        out.append(
            (
                f"query {query[:30]}",
                f"{PREDICT}?{query}",
                {"content-type": "image/png"},
                good_png,
                {422},
            )
        )
    # --- STOW-RS
    other_study = make_dataset(phantom().astype(np.uint16), bits_stored=12)
    out += [
        raw("stow not multipart", "application/dicom", good_dcm, {415}, STOW),
        raw(
            "stow no boundary", 'multipart/related; type="application/dicom"', b"--x--", {400}, STOW
        ),
        stow("stow garbage part", [b"garbage"], {409}),
        stow("stow good and garbage", [dicom(), b"garbage"], {202}),
        stow("stow no sop uid", [dicom(drop("SOPInstanceUID"))], {409}),
        stow("stow no study uid", [dicom(drop("StudyInstanceUID"))], {409}),
        stow("stow mammogram", [dicom(modality="MG")], {409}),
        stow("stow pixel data short", [dicom(setting(PixelData=b"\0" * 10))], {409}),
        stow(
            "stow other study on /studies/uid",
            [to_bytes(other_study)],
            {409},
            f"{STOW}/{generate_uid()}",
        ),
        stow("stow empty part", [b""], {400, 409}),
        (
            "stow json parts",
            STOW,
            {"content-type": 'multipart/related; type="application/json"; boundary=zz'},
            b"--zz\r\nContent-Type: application/json\r\n\r\n{}\r\n--zz--\r\n",
            {409, 415},
        ),
        (
            "stow no parts",
            STOW,
            {"content-type": 'multipart/related; type="application/dicom"; boundary=zz'},
            b"--zz--\r\n",
            {400},
        ),
        (
            "stow bad study uid in path",
            f"{STOW}/not-a-uid!",
            {"content-type": 'multipart/related; type="application/dicom"; boundary=zz'},
            b"--zz--\r\n",
            {422},
        ),
    ]
    return out


CASES = cases()


def test_the_suite_is_large_enough():
    assert len(CASES) >= 80, len(CASES)


@pytest.mark.parametrize("name,path,headers,body,allowed", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_a_clear_answer(app_client, name, path, headers, body, allowed):
    r = app_client.post(path, content=body, headers=headers)
    assert r.status_code < 500, (name, r.status_code, r.text[:200])
    assert r.status_code in allowed, (name, r.status_code, r.text[:200])
    if r.status_code in REFUSED or r.status_code == 404:
        error = r.json()
        assert error["error"] and error["detail"], error
    if path.startswith(STOW) and r.status_code in (202, 409):
        assert "00081198" in r.json()  # FailedSOPSequence: which instance, and why
    assert app_client.get("/readyz").status_code == 200
