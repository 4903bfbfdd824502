"""API keys: every endpoint but the probes needs a valid bearer key; keys never reach a log."""

from __future__ import annotations

import pytest

from tests.conftest import bone_phantom, png_bytes

KEYS = ["k-7f3a9c2e51", "k-second-key-0042"]


@pytest.fixture(scope="module")
def secured():
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    with TestClient(create_app(Settings(api_keys=KEYS))) as client:
        yield client


def test_probes_are_open_and_everything_else_needs_a_key(secured):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert secured.get(path).status_code == 200, path
    for path in ("/v1/models", "/metrics", "/docs", "/openapi.json", "/dicomweb/studies/1.2.3"):
        r = secured.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"] == "unauthorized"


def test_a_valid_key_is_served_and_a_wrong_one_is_not(secured, captured_logs):
    body = png_bytes(bone_phantom(200, 160))
    for headers, status in (
        ({}, 401),
        ({"authorization": "Bearer nope"}, 401),
        ({"authorization": f"Basic {KEYS[0]}"}, 401),
        ({"authorization": f"Bearer {KEYS[1]}"}, 200),
        ({"authorization": f"bearer {KEYS[0]}"}, 200),
    ):
        r = secured.post(
            "/v1/predict", content=body, headers={"content-type": "image/png", **headers}
        )
        assert r.status_code == status, (headers, r.text)
    text = captured_logs.text
    assert all(k not in text for k in KEYS)


def test_metrics_can_be_public():
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    with TestClient(create_app(Settings(api_keys=KEYS, metrics_public=True))) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/models").status_code == 401


def test_each_study_leaves_an_audit_line_naming_the_key_not_the_patient(secured, captured_logs):
    import json

    from app.api.auth import key_id
    from app.core.logs import JsonFormatter
    from app.dicom.multipart import build_related
    from tests.dicom_factory import make_dataset, to_bytes

    ds = make_dataset(bone_phantom(200, 160).astype("uint16") * 8, bits_stored=12)
    body, ctype = build_related([to_bytes(ds)])
    headers = {"authorization": f"Bearer {KEYS[1]}"}
    r = secured.post("/dicomweb/studies", content=body, headers={"content-type": ctype, **headers})
    assert r.status_code == 200
    records = [rec for rec in captured_logs.records if rec.name == "app.audit"]
    line = json.loads(JsonFormatter().format(records[-1]))
    audit = line["audit"]
    assert audit["caller"] == f"key:{key_id(KEYS[1])}" and audit["delivery"] == "kept"
    assert audit["study"] and audit["study"] not in str(ds.StudyInstanceUID)
    assert set(audit["models"]) == {"cropper", "classifier", "detector"}
    assert audit["images"] == 1 and isinstance(audit["fracture"], bool)
    text = json.dumps(line)
    assert str(ds.StudyInstanceUID) not in text and str(ds.PatientID) not in text
    assert KEYS[1] not in text


def test_starting_without_a_key_warns_and_with_keys_does_not(capsys, tmp_path):
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    for keys, warned in (([], True), (KEYS, False)):
        capsys.readouterr()
        with TestClient(create_app(Settings(api_keys=keys, models_dir=tmp_path))):
            pass
        assert ("no API key set" in capsys.readouterr().err) is warned
