"""The fused image score (classifier card `fusion`, Xie et al.): with the very detector file it was
fitted for, fracture_probability mixes the classifier's raw probability with the best box the
detector finds down to the floor, then its own calibration and threshold; the answer's boxes stay
those of the requested operating point. With any other detector the classifier's own serves."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from app.core.config import Settings
from app.inference.decoding import DecodedImage
from app.inference.model_card import (
    Calibration,
    CardError,
    Fusion,
    Verdict,
    read_card,
    validate_card,
)
from app.inference.pipeline import (
    FUSION_BOX_FLOOR,
    ImageWork,
    detect_crops,
    run_study,
)
from app.inference.plan import Plan, Scoring
from tests.conftest import bone_phantom


def with_fusion(clf, fusion: Fusion | None):
    model = copy.copy(clf)
    model.card = clf.card.model_copy(update={"fusion": fusion})
    return model


def works() -> list[ImageWork]:
    rng = np.random.default_rng(1)
    out = []
    for h, w in ((480, 640), (700, 520)):
        pixels = bone_phantom(h, w).astype(np.float32) + rng.normal(0, 3, (h, w))
        out.append(ImageWork(image=DecodedImage(pixels=pixels, source="png"), decode_ms=0.0))
    return out


def test_the_fused_score_mixes_the_raw_probability_with_the_best_box(chain):
    crp, clf, det, point = chain
    platt = Calibration(slope=1.3, intercept=-0.4, fitted_on="test")
    fusion = Fusion(
        detector=det.name,
        detector_sha256=det.card.sha256,
        classifier_weight=0.5,
        calibration=platt,
        decision_threshold=0.3,
        chosen_on="test",
    )
    fused = with_fusion(clf, fusion)
    batch = works()
    run_study(batch, Plan.of(crp, fused, det, point))
    for w in batch:
        _, scores = detect_crops(det, [w.crop], FUSION_BOX_FLOOR, [w.crop_levels])[0]
        best = float(scores.max()) if len(scores) else 0.0
        assert w.max_box_score == pytest.approx(best, abs=1e-6)
        expected = platt.apply(0.5 * w.classifier_probability + 0.5 * best)
        assert w.probability == pytest.approx(expected, abs=1e-9)
        assert all(s >= point.detector_threshold for s in w.scores)  # the requested point
    scoring = Scoring.of(fused, det)
    assert scoring.decision_threshold == 0.3 and scoring.fusion == fusion
    assert det.name in scoring.description

    # fitted for another file of the detector: the classifier's own probability and threshold
    other = with_fusion(clf, fusion.model_copy(update={"detector_sha256": "0" * 64}))
    alone = works()
    run_study(alone, Plan.of(crp, other, det, point))
    calibration = clf.card.calibration
    for w in alone:
        raw = w.classifier_probability
        assert w.probability == pytest.approx(calibration.apply(raw) if calibration else raw)
    # a verdict fitted for the fused score judges it: fracture from its high threshold
    verdict = Verdict(
        no_fracture_below=0.1,
        fracture_from=0.7,
        target_sensitivity=0.95,
        target_specificity=0.95,
        chosen_on="test",
    )
    judged = Scoring.of(with_fusion(clf, fusion.model_copy(update={"verdict": verdict})), det)
    assert judged.decision_threshold == 0.7
    assert [judged.level(p) for p in (0.7, 0.3, 0.05)] == ["fracture", "doubt", "no_fracture"]
    assert Scoring.of(fused, det).level(0.3) == "fracture"  # none: two levels at 0.3

    scoring = Scoring.of(other, det)
    assert scoring.decision_threshold == float(clf.card.decision_threshold)
    assert scoring.fusion is None and det.name not in scoring.description


def test_only_a_classifier_card_carries_a_fusion():
    s = Settings()
    card = read_card(s.models_dir / f"{s.default_detector}.json").as_json()
    card["fusion"] = {
        "detector": card["name"],
        "detector_sha256": card["sha256"],
        "classifier_weight": 0.5,
        "decision_threshold": 0.5,
        "chosen_on": "test",
    }
    with pytest.raises(CardError, match="fusion"):
        validate_card(card, "detector.json")
