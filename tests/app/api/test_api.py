"""The real app on the bundled models, over HTTP (no mocks of the pipeline)."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import RLELossless

from app.inference.model_card import ModelCard
from app.inference.operating_point import from_fp_rate
from tests.app.inference.test_decoding import _png_header_only
from tests.conftest import bone_phantom, phantom_box, png_bytes
from tests.dicom_factory import PATIENT, make_dataset, to_bytes


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    return body


def served_card(client, role: str) -> dict:
    return next(
        m for m in client.get("/v1/models").json()["models"] if m["role"] == role and m["default"]
    )


# --- health and model cards ----------------------------------------------------------------------


def test_health_ready_and_aliases(app_client):
    for path in ("/healthz", "/v2/health/live"):
        assert app_client.get(path).status_code == 200
    for path in ("/readyz", "/v2/health/ready"):
        r = app_client.get(path)
        assert r.status_code == 200 and r.json()["status"] == "ready"


def test_models_are_the_cards_with_their_provider(app_client):
    models = app_client.get("/v1/models").json()["models"]
    roles = {m["role"] for m in models}
    assert roles == {"cropper", "classifier", "detector"}
    for m in models:
        assert len(m["sha256"]) == 64 and m["execution_provider"].endswith("ExecutionProvider")
        assert m["loaded"] and m["input"]["size"]
    assert all("operating_points" in m for m in models if m["role"] == "detector")
    assert all(0 < m["decision_threshold"] < 1 for m in models if m["role"] == "classifier")


def test_openapi_documents_predict(app_client):
    assert app_client.get("/docs").status_code == 200
    spec = app_client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def test_openapi_documents_every_answer_and_the_real_error_shape(app_client):
    """Every route documents its 200 (or 201) body, and errors as {error, detail}: never FastAPI's default
    validation shape, which this service does not send."""
    spec = app_client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            ok = op["responses"].get("200") or op["responses"]["201"]
            assert ok.get("content"), (method, path)
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")) and "application/dicom+json" not in response.get(
                    "content", {}
                ):  # STOW-RS 409 answers in DICOM JSON, as PS3.18 says
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": f"#/components/schemas/Error{status}"}, (path, status)
    # error codes as an enum a client can branch on
    codes = spec["components"]["schemas"]["Error422"]["properties"]["error"]["enum"]
    assert {"out_of_scope", "mixed_studies", "undecodable_pixel_data"} <= set(codes)
    predict = spec["paths"]["/v1/predict"]["post"]["responses"]
    assert predict["200"]["content"]["application/json"]["schema"]["$ref"].endswith("StudyAnswer")
    image = spec["components"]["schemas"]["ImageResult"]["properties"]
    assert {"fracture_probability", "crop_box", "detections"} <= set(image)


# --- predictions on real images ------------------------------------------------------------------


def test_predict_real_fracatlas_jpeg(app_client, test_split_images):
    path = next(p for p in test_split_images if p.parent.name == "Fractured")
    r = app_client.post(
        "/v1/predict", content=path.read_bytes(), headers={"content-type": "image/jpeg"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    with Image.open(path) as im:
        from PIL import ImageOps

        width, height = ImageOps.exif_transpose(im).size
    img = body["images"][0]
    assert (img["width"], img["height"]) == (width, height)
    x1, y1, x2, y2 = img["crop_box"]
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert 0.0 <= img["fracture_probability"] <= 1.0
    assert img["fracture"] == (img["fracture_probability"] >= body["decision_threshold"])
    assert img["fracture"] == (img["verdict"] == "fracture")
    bands = body["verdict_thresholds"]
    if bands is not None:  # the card's three-level verdict: fracture from the decision threshold
        assert bands["fracture_from"] == body["decision_threshold"]
        p, low = img["fracture_probability"], bands["no_fracture_below"]
        expected = "fracture" if img["fracture"] else "no_fracture" if p < low else "doubt"
        assert img["verdict"] == expected
    assert set(body["models"]) == {"cropper", "classifier", "detector"}
    assert body["operating_point"]["fp_per_image"] == 0.4
    for d in img["detections"]:
        assert (
            d["label"] == "fracture" and d["score"] >= body["operating_point"]["detector_threshold"]
        )
        bx1, by1, bx2, by2 = d["box"]
        assert x1 <= bx1 < bx2 <= x2 and y1 <= by1 < by2 <= y2
    assert set(img["timings_ms"]) == {"decode", "crop", "classify", "detect"}
    assert body["study"]["fracture_probability"] == img["fracture_probability"]


def test_multipart_study_is_the_max_over_images(app_client, test_split_images, dicom_dir):
    # JPEGs carry no patient or study: they join the one DICOM study
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in test_split_images[:3]]
    files.append(
        ("files", ("hip.dcm", (dicom_dir / "RG2_JPLY_fixed.dcm").read_bytes(), "application/dicom"))
    )
    r = app_client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["index"] for i in body["images"]] == [0, 1, 2, 3]
    assert [i["filename"] for i in body["images"]][-1] == "hip.dcm"
    assert body["images"][3]["sop_instance_uid"]
    probs = [i["fracture_probability"] for i in body["images"]]
    assert body["study"]["fracture_probability"] == max(probs)
    assert body["study"]["fracture"] == any(i["fracture"] for i in body["images"])
    levels = [i["verdict"] for i in body["images"]]
    worst = next(v for v in ("fracture", "doubt", "no_fracture") if v in levels)
    assert body["study"]["verdict"] == worst


def test_every_decodable_shared_dicom_goes_through(app_client, dicom_dir, dicom_manifest):
    """Every decodable limb or pelvis radiograph is analysed; chest films are refused with the
    reason (the models were never made for them)."""
    refused = []
    for row in dicom_manifest:
        if row["decodes_with_pydicom3_pylibjpeg"] != "ok" or row["modality"] == "MG":
            continue
        r = app_client.post(
            "/v1/predict",
            content=(dicom_dir / row["file"]).read_bytes(),
            headers={"content-type": "application/dicom"},
        )
        if row["body_part"] == "CHEST":
            assert r.status_code == 422 and r.json()["error"] == "out_of_scope", r.text
            assert "CHEST" in r.json()["detail"]
            refused.append(row["file"])
            continue
        assert r.status_code == 200, (row["file"], r.text)
        rows, cols = (int(v) for v in row["rows_x_cols"].split("x"))
        img = r.json()["images"][0]
        assert (img["height"], img["width"]) == (rows, cols)
    assert {"CR-MONO1-10-chest.dcm", "RG1_J2KI.dcm"} <= set(refused)


@pytest.mark.parametrize("name", ["966.dcm", "RG3_JPLY.dcm"])
def test_broken_dicoms_are_422_naming_the_transfer_syntax(
    app_client, dicom_dir, dicom_manifest, name
):
    row = next(r for r in dicom_manifest if r["file"] == name)
    r = app_client.post(
        "/v1/predict",
        content=(dicom_dir / name).read_bytes(),
        headers={"content-type": "application/dicom"},
    )
    assert r.status_code == 422
    assert row["ts_uid"] in error_of(r)["detail"]


def test_mammogram_is_422(app_client, dicom_dir):
    r = app_client.post(
        "/v1/predict",
        content=(dicom_dir / "OutOfBoundsOverlay.dcm").read_bytes(),
        headers={"content-type": "application/dicom"},
    )
    assert r.status_code == 422 and error_of(r)["error"] == "unsupported_modality"


def test_compressed_dicom_written_here(app_client):
    ds = make_dataset(bone_phantom(200, 160).astype(np.uint16) * 16, bits_stored=12)
    ds.compress(RLELossless)
    r = app_client.post(
        "/v1/predict", content=to_bytes(ds), headers={"content-type": "application/dicom"}
    )
    assert r.status_code == 200 and r.json()["images"][0]["sop_instance_uid"] == ds.SOPInstanceUID


# --- coordinates ---------------------------------------------------------------------------------


def _check_frame(img: dict, width: int, height: int, bone: tuple[int, int, int, int]) -> None:
    assert (img["width"], img["height"]) == (width, height)
    x1, y1, x2, y2 = img["crop_box"]
    bx1, by1, bx2, by2 = bone
    # The crop holds the bone and stays in the frame; the empty left side is cut away.
    assert 0 <= x1 <= bx1 and 0 <= y1 <= by1 and bx2 <= x2 <= width and by2 <= y2 <= height
    assert not img["crop_fallback"]
    assert (x2 - x1) * (y2 - y1) < 0.7 * width * height
    for d in img["detections"]:
        dx1, dy1, dx2, dy2 = d["box"]
        assert x1 <= dx1 < dx2 <= x2 and y1 <= dy1 < dy2 <= y2


def test_boxes_come_back_in_the_uploaded_frame(app_client):
    height, width = 480, 640
    r = app_client.post(
        "/v1/predict?score_threshold=0.0001",
        content=png_bytes(bone_phantom(height, width)),
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 200, r.text
    _check_frame(r.json()["images"][0], width, height, phantom_box(height, width))


def test_boxes_come_back_in_the_exif_oriented_frame(app_client):
    height, width = 480, 640
    stored = np.ascontiguousarray(np.rot90(bone_phantom(height, width), k=1))  # 640 x 480 as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: back to 480 x 640 as the phantom
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    r = app_client.post(
        "/v1/predict?score_threshold=0.0001",
        content=buf.getvalue(),
        headers={"content-type": "image/jpeg"},
    )
    assert r.status_code == 200, r.text
    _check_frame(r.json()["images"][0], width, height, phantom_box(height, width))


# --- operating points ----------------------------------------------------------------------------


def test_operating_point_interpolates_the_card(app_client, test_split_images):
    card = ModelCard.model_validate(served_card(app_client, "detector"))
    data = test_split_images[0].read_bytes()
    r = app_client.post(
        "/v1/predict?fp_per_image=0.25", content=data, headers={"content-type": "image/jpeg"}
    )
    expected = from_fp_rate(card, 0.25)
    point = r.json()["operating_point"]
    assert point["detector_threshold"] == pytest.approx(expected.detector_threshold, abs=1e-6)
    assert point["expected_recall"] == pytest.approx(expected.expected_recall, abs=1e-4)
    r = app_client.post(
        "/v1/predict?score_threshold=0.01", content=data, headers={"content-type": "image/jpeg"}
    )
    assert r.json()["operating_point"] == {
        "fp_per_image": None,
        "detector_threshold": 0.01,
        "expected_recall": None,
    }
    assert all(d["score"] >= 0.01 for d in r.json()["images"][0]["detections"])


@pytest.mark.parametrize(
    "query",
    [
        "fp_per_image=0.05",
        "fp_per_image=0.6",
        "score_threshold=1.5",
        "fp_per_image=abc",
        "classifier=nope",
        "detector=nope",
    ],
)
def test_bad_parameters_are_422(app_client, query):
    r = app_client.post(
        f"/v1/predict?{query}",
        content=png_bytes(bone_phantom(64, 64)),
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 422
    error_of(r)


def test_models_chosen_by_name(app_client):
    clf = served_card(app_client, "classifier")["name"]
    det = served_card(app_client, "detector")["name"]
    r = app_client.post(
        f"/v1/predict?classifier={clf}&detector={det}",
        content=png_bytes(bone_phantom(64, 64)),
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 200
    assert (
        r.json()["models"]["classifier"]["name"] == clf
        and r.json()["models"]["detector"]["name"] == det
    )


# --- what clients get wrong ----------------------------------------------------------------------


def test_client_errors(app_client):
    cases = [
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415),
        (dict(content=b"", headers={"content-type": "image/png"}), 400),
        (dict(content=b"\x89PNG\r\n\x1a\ngarbage", headers={"content-type": "image/png"}), 422),
        (
            dict(content=_png_header_only(100_000, 100_000), headers={"content-type": "image/png"}),
            413,
        ),
        (dict(files=[("other", ("a.txt", b"x", "text/plain"))]), 400),
        (dict(files=[("files", ("a.txt", b"just text", "text/plain"))]), 415),
        (
            dict(
                content=b"--x\r\nbroken",
                headers={"content-type": "multipart/form-data; boundary=x"},
            ),
            400,
        ),
        (
            dict(
                content=b"abc",
                headers={"content-type": "multipart/related; type=application/dicom"},
            ),
            415,
        ),
    ]
    for kwargs, status in cases:
        r = app_client.post("/v1/predict", **kwargs)
        assert r.status_code == status, (kwargs.get("headers"), r.status_code, r.text)
        error_of(r)


def test_too_many_images_is_413(app_client):
    limit = app_client.app.state.fracture.settings.max_images_per_request
    small = png_bytes(bone_phantom(32, 32))
    r = app_client.post(
        "/v1/predict", files=[("files", (f"{i}.png", small, "image/png")) for i in range(limit + 1)]
    )
    assert r.status_code == 413 and error_of(r)["error"] == "too_many_images"


def test_body_over_the_limit_is_413():
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    app = create_app(Settings(max_body_bytes=4096))
    with TestClient(app) as client:
        r = client.post(
            "/v1/predict", content=b"\x89PNG" + b"0" * 10_000, headers={"content-type": "image/png"}
        )
        assert r.status_code == 413 and error_of(r)["error"] == "body_too_large"

        def chunks():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b"0" * 1024

        r = client.post("/v1/predict", content=chunks(), headers={"content-type": "image/png"})
        assert r.status_code == 413


def test_random_bytes_never_give_a_500(app_client):
    rng = random.Random(7)
    types = [
        "application/dicom",
        "image/png",
        "image/jpeg",
        "application/octet-stream",
        "",
        "text/plain",
    ]
    prefixes = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\0" * 128 + b"DICM"]
    for _ in range(40):
        body = rng.choice(prefixes) + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))
        r = app_client.post(
            "/v1/predict", content=body, headers={"content-type": rng.choice(types)}
        )
        assert 400 <= r.status_code < 500, (r.status_code, r.text)


# --- privacy and metrics -------------------------------------------------------------------------


def test_no_patient_identifier_in_any_log_line(app_client, captured_logs):
    good = make_dataset(bone_phantom(120, 100).astype(np.uint16), bits_stored=12)
    broken = make_dataset(bone_phantom(120, 100).astype(np.uint16), bits_stored=12)
    broken.PixelData = broken.PixelData[:100]
    answers = []
    for ds in (good, broken):
        r = app_client.post(
            "/v1/predict", content=to_bytes(ds), headers={"content-type": "application/dicom"}
        )
        answers.append(r.text)
    assert json.loads(answers[0])["images"] and json.loads(answers[1])["error"]
    logged = captured_logs.text
    assert "request" in logged  # the app does log these requests
    for value in PATIENT.values():
        for part in value.split("^"):
            assert part not in logged and all(part not in a for a in answers), part


def test_metrics_text(app_client):
    app_client.post(
        "/v1/predict",
        content=png_bytes(bone_phantom(64, 64)),
        headers={"content-type": "image/png"},
    )
    app_client.post("/v1/predict", content=b"nope", headers={"content-type": "text/plain"})
    text = app_client.get("/metrics").text
    for needle in [
        'fracture_requests_total{endpoint="/v1/predict",status="200"}',
        'fracture_requests_total{endpoint="/v1/predict",status="415"}',
        'fracture_request_duration_seconds_bucket{endpoint="/v1/predict",le="0.5"}',
        'fracture_stage_duration_seconds_count{stage="decode"}',
        'fracture_stage_duration_seconds_count{stage="detect"}',
        'fracture_images_total{outcome="no_fracture"}',
        'fracture_images_total{outcome="rejected"}',
        "fracture_requests_in_flight",
        'fracture_inference_batch_size_bucket{le="1.0",stage="classify"}',
        'execution_provider="CPUExecutionProvider"',
    ]:
        assert needle in text, needle
    assert "fracture_model_info{" in text


def test_not_ready_when_a_model_does_not_match_its_card(tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    for path in Settings().models_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    card_path = next(tmp_path.glob("cropper*.json"))
    card = json.loads(card_path.read_text())
    card["sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with TestClient(create_app(Settings(models_dir=tmp_path))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "sha256" in error_of(r)["detail"]
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/healthz").status_code == 200  # alive, not ready
        r = client.post(
            "/v1/predict",
            content=png_bytes(bone_phantom(64, 64)),
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 503 and error_of(r)["error"] == "not_ready"


def test_not_ready_without_a_detector(tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    for card_path in Settings().models_dir.glob("*.json"):
        card = json.loads(card_path.read_text())
        if card["task"] != "detection":
            shutil.copy(card_path, tmp_path / card_path.name)
            shutil.copy(card_path.parent / card["file"], tmp_path / card["file"])
    with TestClient(create_app(Settings(models_dir=tmp_path))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "detector" in error_of(r)["detail"]


def test_two_patients_in_one_request_are_refused_naming_the_files(app_client, dicom_dir):
    """NM_Kakadu44 (PatientID XXXXXXXX) and RG3_UNC (11RG3): one request, two patients."""
    files = [
        ("files", (name, (dicom_dir / name).read_bytes(), "application/dicom"))
        for name in ("NM_Kakadu44_SOTmarkerincons.dcm", "RG3_UNC.dcm")
    ]
    r = app_client.post("/v1/predict", files=files)
    assert r.status_code == 422 and r.json()["error"] == "mixed_studies"
    detail = r.json()["detail"]
    assert "NM_Kakadu44_SOTmarkerincons.dcm" in detail and "RG3_UNC.dcm" in detail
    assert "11RG3" not in detail and "XXXXXXXX" not in detail  # files named, never the patient


def test_views_of_one_patient_and_study_stay_one_study(app_client, dicom_dir):
    """RG3_UNC and RG3_JPLL: the same patient and study in two transfer syntaxes."""
    files = [
        ("files", (name, (dicom_dir / name).read_bytes(), "application/dicom"))
        for name in ("RG3_UNC.dcm", "RG3_JPLL.dcm")
    ]
    r = app_client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["study"]["images"] == 2


def test_a_bad_file_in_a_study_is_refused_alone(app_client, test_split_images, dicom_dir):
    """A FracAtlas JPEG with a chest film and a mammogram: the JPEG is analysed, the other two
    are answered as not analysed with their error codes; all of them bad: 422."""
    jpeg = test_split_images[0]
    chest = (dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes()
    mammo = (dicom_dir / "OutOfBoundsOverlay.dcm").read_bytes()
    files = [
        ("files", (jpeg.name, jpeg.read_bytes(), "image/jpeg")),
        ("files", ("chest.dcm", chest, "application/dicom")),
        ("files", ("mammo.dcm", mammo, "application/dicom")),
    ]
    r = app_client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["index"] for i in body["images"]] == [0] and body["study"]["images"] == 1
    refused = {n["filename"]: n["error"] for n in body["not_analysed"]}
    assert refused == {"chest.dcm": "out_of_scope", "mammo.dcm": "unsupported_modality"}
    assert [n["index"] for n in body["not_analysed"]] == [1, 2]
    r = app_client.post("/v1/predict", files=files[1:])
    assert r.status_code == 422 and r.json()["error"] == "out_of_scope"
    assert "file 0 (chest.dcm)" in r.json()["detail"]


def test_with_keys_the_contract_says_bearer_and_401(tmp_path):
    """With FRACTURE_API_KEYS set the schema carries a bearer scheme, and every route but the
    probes and the viewer page requires it and documents its 401; without keys, none."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    keyed = create_app(Settings(api_keys=["k"], state_dir=tmp_path / "a"))
    spec = TestClient(keyed).get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    predict = spec["paths"]["/v1/predict"]["post"]
    assert predict["security"] == [{"bearerAuth": []}] and "401" in predict["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert spec["components"]["schemas"]["Error401"]["properties"]["error"]["const"] == (
        "unauthorized"
    )
    open_spec = TestClient(create_app(Settings(state_dir=tmp_path / "b"))).get("/openapi.json")
    assert "securitySchemes" not in open_spec.json().get("components", {})
