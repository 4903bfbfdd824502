"""Readers' feedback: readings of real answers stored with who gave them and which models
answered, refused with one sentence when they contradict themselves, listed, counted in
/metrics, and exported as the manifest that `training adapt` reads back (by SOPInstanceUID or
file name) from a site's folder."""

from __future__ import annotations

import csv
import io
import json
import uuid

import numpy as np
import pytest

import training.site
from tests.conftest import bone_phantom, png_bytes
from tests.dicom_factory import make_dataset, to_bytes
from training.site import load_site


def analysed(app_client, files: list[tuple[str, bytes, str]]) -> dict:
    r = app_client.post(
        "/v1/predict", files=[("files", (name, data, ctype)) for name, data, ctype in files]
    )
    assert r.status_code == 200, r.text
    return r.json()


def reading_of(answer: dict, index: int, **judgement) -> dict:
    """A reading as the viewer sends it: the answered image, the models, and the judgement."""
    image = answer["images"][index]
    return {
        "request_id": answer["request_id"],
        "image_index": image["index"],
        "filename": image["filename"],
        "sop_instance_uid": image["sop_instance_uid"],
        "width": image["width"],
        "height": image["height"],
        "models": answer["models"],
        "verdict": image["verdict"],
        "fracture_probability": image["fracture_probability"],
        **judgement,
    }


@pytest.fixture(scope="module")
def answer(app_client) -> dict:
    phantom = bone_phantom(480, 640)
    dicom = make_dataset(phantom.astype(np.uint16) * 16)
    return analysed(
        app_client,
        [
            ("wrist-ap.dcm", to_bytes(dicom), "application/dicom"),
            ("wrist-lat.png", png_bytes(bone_phantom(400, 300)), "image/png"),
        ],
    )


def test_a_reading_is_stored_with_its_reader_models_and_label(app_client, answer):
    first = answer["images"][0]
    judgement = {"missed": [[10, 20, 60, 90]], "boxes": []}
    if first["verdict"] == "doubt":
        judgement["fractured"] = True
    else:
        judgement["agree"] = first["verdict"] == "fracture"
    r = app_client.post("/v1/feedback", json=reading_of(answer, 0, **judgement))
    assert r.status_code == 201, r.text
    stored = r.json()
    assert stored["reader"] == "anonymous"  # no key configured in this app
    assert stored["reader_label"] is True
    assert stored["models"]["classifier"] == answer["models"]["classifier"]
    listed = app_client.get("/v1/feedback", params={"request_id": answer["request_id"]}).json()
    assert [f["feedback_id"] for f in listed["feedback"]] == [stored["feedback_id"]]
    metrics = app_client.get("/metrics").text
    assert "fracture_feedback_total{" in metrics


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"missed": [[10, 20, 9000, 90]]}, "lies outside"),
        ({"agree": None, "fractured": None}, "empty reading"),
        ({"verdict": "doubt", "agree": True}, "doubt verdict"),
        ({"verdict": "fracture", "agree": True, "fractured": False}, "contradicts"),
        ({"fractured": False, "agree": None, "missed": [[1, 1, 5, 5]]}, "not fractured"),
        ({"filename": None, "sop_instance_uid": None}, "names its image"),
    ],
)
def test_a_reading_that_contradicts_itself_is_refused(app_client, answer, change, message):
    body = {**reading_of(answer, 1, agree=True), "verdict": "no_fracture", **change}
    r = app_client.post("/v1/feedback", json=body)
    assert r.status_code == 422 and r.json()["error"] == "invalid_parameter"
    assert message in r.json()["detail"]


def test_the_manifest_feeds_adapt_from_the_site_folder(app_client, tmp_path, monkeypatch):
    """Read, export, adapt's loader: the DICOM is found by its SOPInstanceUID though the site
    keeps it under another name, the PNG by its file name in a nested folder."""
    phantom = bone_phantom(480, 640)
    dicom = to_bytes(make_dataset(phantom.astype(np.uint16) * 16))
    png = png_bytes(bone_phantom(400, 300))
    name = f"lat-{uuid.uuid4().hex[:8]}.png"
    answer = analysed(
        app_client, [("ap.dcm", dicom, "application/dicom"), (name, png, "image/png")]
    )
    ap, lat = answer["images"]
    box = [5.0, 5.0, 50.0, 60.0]
    # the DICOM: read as fractured, one missed box; a first reading of the PNG, then a second
    readings = [
        reading_of(answer, 0, fractured=True, missed=[box])
        if ap["verdict"] == "doubt"
        else reading_of(answer, 0, agree=ap["verdict"] == "fracture", missed=[box]),
        reading_of(answer, 1, fractured=True),
        reading_of(answer, 1, fractured=False),
    ]
    for body in readings:
        assert app_client.post("/v1/feedback", json=body).status_code == 201
    r = app_client.get("/v1/feedback/manifest.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = {
        row["sop_instance_uid"] or row["path"]: row for row in csv.DictReader(io.StringIO(r.text))
    }
    assert rows[name]["fractured"] == "0"  # the latest reading counts
    dicom_row = rows[ap["sop_instance_uid"]]
    assert dicom_row["fractured"] == "1" and json.loads(dicom_row["boxes"]) == [box]

    site = tmp_path / "site"
    (site / "archive" / "2026").mkdir(parents=True)
    (site / "archive" / "2026" / "IM000001").write_bytes(dicom)  # as a PACS export names it
    (site / "lateral").mkdir()
    (site / "lateral" / name).write_bytes(png)
    chosen = [rows[ap["sop_instance_uid"]], rows[name]]
    with open(site / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(chosen[0]))
        writer.writeheader()
        writer.writerows(chosen)
    monkeypatch.setattr(training.site, "MIN_IMAGES", 2)
    loaded = load_site(site)
    assert loaded.skipped == []
    by_name = {p.path.split("/")[-1]: p for p in loaded.records}
    assert by_name["IM000001"].fractured and not by_name[name].fractured
    # the missed box, normalised by the DICOM's own size
    assert by_name["IM000001"].boxes == [[5 / 640, 5 / 480, 50 / 640, 60 / 480]]
