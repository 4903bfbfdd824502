"""What the models were never made for, through the running service: a colour photograph, a
grey photograph and a screenshot of code are refused (the last two by the radiograph probe on
the classifier's features), alone or among radiographs; a FracAtlas radiograph carries its
ood_score; refusals reach the metrics."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.core.config import Settings
from app.inference.model_card import read_card


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def familiarity() -> object:
    s = Settings()
    card = read_card(s.models_dir / f"{s.default_classifier}.json")
    if card.familiarity is None:
        pytest.skip("the default classifier card carries no familiarity reference")
    return card.familiarity


def test_a_colour_photograph_is_refused(app_client):
    skimage_data = pytest.importorskip("skimage.data")
    r = app_client.post(
        "/v1/predict",
        content=png(skimage_data.astronaut()),
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "out_of_scope" and "coloured" in r.json()["detail"]


def test_a_code_screenshot_is_refused_as_no_radiograph(app_client):
    """The grey PNG of source code the issue sent: refused by the radiograph probe where the
    card ships one, else answered flagged outside validated conditions."""
    from training.familiarity import code_screenshot

    reference = familiarity()
    r = app_client.post(
        "/v1/predict", content=code_screenshot(), headers={"content-type": "image/png"}
    )
    if reference.probe_refuse_above is not None or r.status_code == 422:
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "out_of_scope" and "radiograph" in r.json()["detail"]
        return
    assert r.status_code == 200, r.text
    image = r.json()["images"][0]
    assert image["ood_score"] > reference.threshold and image["out_of_distribution"] is True
    assert any("outside validated conditions" in note for note in image["notes"])
    assert r.json()["study"]["out_of_distribution"] is True


def test_a_grey_photograph_is_refused(app_client):
    """scikit-image's camera man, grey (the colour rule cannot see it): refused by the probe."""
    skimage_data = pytest.importorskip("skimage.data")
    if familiarity().probe_refuse_above is None:
        pytest.skip("the default classifier card ships no radiograph probe")
    r = app_client.post(
        "/v1/predict", content=png(skimage_data.camera()), headers={"content-type": "image/png"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "out_of_scope" and "no radiograph" in r.json()["detail"]
    metrics = app_client.get("/metrics").text
    assert 'fracture_images_refused_total{reason="out_of_scope"}' in metrics


def test_a_screenshot_among_radiographs_is_left_out_of_the_study(app_client, test_split_images):
    """A page of code sent with a radiograph: the page is answered as not analysed with the
    reason, the study verdict comes from the radiograph alone."""
    from training.familiarity import code_screenshot

    if familiarity().probe_refuse_above is None:
        pytest.skip("the default classifier card ships no radiograph probe")
    jpeg = test_split_images[0]
    files = [
        ("files", (jpeg.name, jpeg.read_bytes(), "image/jpeg")),
        ("files", ("editor.png", code_screenshot(), "image/png")),
    ]
    r = app_client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["index"] for i in body["images"]] == [0] and body["study"]["images"] == 1
    assert [(n["index"], n["filename"], n["error"]) for n in body["not_analysed"]] == [
        (1, "editor.png", "out_of_scope")
    ]


def test_a_radiograph_carries_its_ood_score(app_client, test_split_images):
    familiarity()
    path = test_split_images[0]
    r = app_client.post(
        "/v1/predict", content=path.read_bytes(), headers={"content-type": "image/jpeg"}
    )
    assert r.status_code == 200, r.text
    image = r.json()["images"][0]
    assert isinstance(image["ood_score"], float) and image["ood_score"] > 0
    assert isinstance(image["out_of_distribution"], bool)
    assert "fracture_image_ood_score_bucket" in app_client.get("/metrics").text
