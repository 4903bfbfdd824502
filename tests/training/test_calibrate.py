"""Site calibration: fitted through the served pipeline on labelled images, loaded by the service
over the shipped cards, refused when it was fitted for another model file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from app.core.config import Settings
from app.inference.model_card import Calibration, read_site_calibration
from tests.conftest import FRACATLAS, need


def test_platt_recovers_a_known_miscalibration():
    from training.calibrate import fit_platt

    rng = np.random.default_rng(0)
    truth = rng.uniform(0.02, 0.98, 4000)
    labels = (rng.uniform(size=truth.size) < truth).astype(int)
    # an overconfident model: logit doubled
    z = 2 * np.log(truth / (1 - truth))
    probs = 1 / (1 + np.exp(-z))
    fit = fit_platt(labels.tolist(), probs.tolist(), "synthetic")
    assert fit.slope == pytest.approx(0.5, abs=0.08) and abs(fit.intercept) < 0.15
    assert Calibration(slope=1, intercept=0, fitted_on="x").apply(0.3) == pytest.approx(0.3)


def test_site_calibration_is_served_over_the_cards(tmp_path):
    need(FRACATLAS)
    from fastapi.testclient import TestClient

    from app.main import create_app
    from training.calibrate import calibrate
    from training.data import load_records

    records = [r for r in load_records(FRACATLAS) if r.split == "val"]
    picked = [r for r in records if r.fractured][:12] + [r for r in records if not r.fractured][:28]
    models = Settings().models_dir
    site, summary = calibrate(picked, models, None, None, "test-site")
    assert site.images == 40 and site.fractured == 12
    fused, _ = calibrate(picked, models, None, None, "test-site", fuse=True, fuse_shifts=("rot90",))
    fusion = fused.classifier.fusion  # the weight with the highest AUROC here, or none
    assert fusion is None or fusion.classifier_weight in (0.25, 0.5, 0.75)
    assert fusion is None or "--shift rot90" in fusion.chosen_on
    assert summary["brier_calibrated"] <= summary["brier_raw"] + 1e-9
    path = tmp_path / "site.json"
    path.write_text(site.model_dump_json())
    assert read_site_calibration(path).site == "test-site"

    with TestClient(create_app(Settings(site_calibration=path))) as client:
        assert client.get("/readyz").status_code == 200
        served = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        clf = served[site.classifier.name]
        assert clf["site"] == "test-site"
        assert clf["decision_threshold"] == pytest.approx(site.classifier.decision_threshold)
        assert clf["calibration"]["slope"] == pytest.approx(site.classifier.calibration.slope)
        det = served[site.detector.name]
        assert [r["threshold"] for r in det["operating_points"]] == [
            r.threshold for r in site.detector.operating_points
        ]
        image = picked[0].path
        with open(image, "rb") as fh:
            r = client.post(
                "/v1/predict", content=fh.read(), headers={"content-type": "image/jpeg"}
            )
        assert r.status_code == 200
        # the shipped card's fusion with the default detector is refitted at the site too
        fusion = site.classifier.fusion
        expected = fusion.decision_threshold if fusion else site.classifier.decision_threshold
        assert r.json()["decision_threshold"] == pytest.approx(expected, abs=1e-9)
        assert (site.detector.name in r.json()["image_score"]) == (fusion is not None)

    # Fitted for another file of the same model: not ready, saying so.
    other = json.loads(path.read_text())
    other["classifier"]["sha256"] = "1" * 64
    path.write_text(json.dumps(other))
    with TestClient(create_app(Settings(site_calibration=path))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "another file" in r.json()["detail"]
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("stale", [False, True])
def test_a_card_without_its_fit_is_fused_at_its_recipes_weight(tmp_path, stale):
    """A classifier shipped before its calibration (an ensemble's export), or whose fusion was
    fitted for another file of the detector (a re-export), is fitted at the fusion weight its
    recipe names, not at the classifier alone."""
    need(FRACATLAS)
    from training.calibrate import calibrate
    from training.data import load_records

    models = tmp_path / "models"
    shutil.copytree(Settings().models_dir, models)
    card_path = models / "classifier-mobilenetv2.json"
    card = json.loads(card_path.read_text())
    if stale:
        card["fusion"]["detector_sha256"] = "1" * 64
    else:
        card.pop("fusion")
    card["recipe"]["fusion_weight"] = 0.5
    card_path.write_text(json.dumps(card))
    records = [r for r in load_records(FRACATLAS) if r.split == "val"]
    picked = [r for r in records if r.fractured][:6] + [r for r in records if not r.fractured][:10]
    site, _ = calibrate(picked, models, None, None, "recipe-weight")
    assert site.classifier.fusion is not None
    assert site.classifier.fusion.classifier_weight == 0.5
    assert "fusion_weight" in site.classifier.fusion.chosen_on
