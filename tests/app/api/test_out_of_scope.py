"""What the models were never made for, through the running service: a colour photograph is
refused, a screenshot of code is answered outside validated conditions, a FracAtlas radiograph
carries its ood_score; the flag reaches the metrics."""

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


def test_a_code_screenshot_is_answered_outside_validated_conditions(app_client):
    from training.familiarity import code_screenshot

    reference = familiarity()
    r = app_client.post(
        "/v1/predict", content=code_screenshot(), headers={"content-type": "image/png"}
    )
    if r.status_code == 422:  # beyond refuse_above: refused as no radiograph at all
        assert r.json()["error"] == "out_of_scope"
        return
    assert r.status_code == 200, r.text
    image = r.json()["images"][0]
    assert image["ood_score"] > reference.threshold and image["out_of_distribution"] is True
    assert any("outside validated conditions" in note for note in image["notes"])
    assert r.json()["study"]["out_of_distribution"] is True
    metrics = app_client.get("/metrics").text
    assert 'fracture_images_flagged_total{classifier="' in metrics
    assert "fracture_image_ood_score_bucket" in metrics


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
