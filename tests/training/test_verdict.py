"""The three-level verdict: thresholds that hold on new images from the same source, ordered,
stored in a card the service reads, and judged the same way by the service."""

from __future__ import annotations

import numpy as np
import pytest

from app.inference.model_card import Verdict
from training.metrics import levels_of, verdict_figures
from training.verdict import fit_verdict, rule_in_point, rule_out_point, split_half_check


def draw(n_pos: int, n_neg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a classifier with AUROC about 0.9 (binormal, 1.8 standard deviations apart)."""
    rng = np.random.default_rng(seed)
    z = np.r_[rng.normal(1.8, 1, n_pos), rng.normal(0, 1, n_neg)]
    return np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int), 1 / (1 + np.exp(-z))


def test_the_quantile_rules():
    scores = np.arange(100) / 100
    assert rule_out_point(scores, 0.95) == 0.05  # 95 of 100 at or above
    t = rule_in_point(scores, 0.95)
    assert np.sum(scores < t) == 95 and t > 0.94


def test_the_bounds_hold_on_new_images_where_the_point_would_not():
    """Fitted on 94 fractured and 429 unfractured images (val's counts), the thresholds keep
    both targets on a large new draw from the same source in most fits; the thresholds at the
    points themselves miss them about half the time."""
    new_y, new_s = draw(20_000, 20_000, seed=999)
    held, held_by_point = 0, 0
    for seed in range(20):
        y, s = draw(94, 429, seed)
        verdict = fit_verdict(y, s, "synthetic", n_boot=500, seed=seed)
        assert verdict.no_fracture_below <= verdict.fracture_from
        low, high = verdict.no_fracture_below_ci95
        assert low <= verdict.no_fracture_below <= high
        level = levels_of(new_s, verdict)
        sens = np.mean(level[new_y == 1] != "no_fracture")
        spec = np.mean(level[new_y == 0] != "fracture")
        held += sens >= 0.95 and spec >= 0.95
        point = Verdict(
            no_fracture_below=rule_out_point(s[y == 1], 0.95),
            fracture_from=rule_in_point(s[y == 0], 0.95),
            target_sensitivity=0.95,
            target_specificity=0.95,
            chosen_on="points",
        )
        level = levels_of(new_s, point)
        held_by_point += (
            np.mean(level[new_y == 1] != "no_fracture") >= 0.95
            and np.mean(level[new_y == 0] != "fracture") >= 0.95
        )
    assert held >= 17 and held_by_point <= 14


def test_figures_and_the_split_half_check():
    y, s = draw(94, 429, seed=3)
    verdict = fit_verdict(y, s, "synthetic", n_boot=300)
    figures = verdict_figures(y, s, verdict, n_boot=200)
    shares = sum(figures[f"share_{k}"]["value"] for k in ("fracture", "doubt", "no_fracture"))
    assert shares == pytest.approx(1.0, abs=1e-3)
    low, high = figures["sensitivity_fracture_or_doubt"]["ci95"]
    assert low <= figures["sensitivity_fracture_or_doubt"]["value"] <= high
    check = split_half_check(y, s, repeats=5)
    assert 0.8 <= check["sensitivity_fracture_or_doubt_mean"] <= 1.0


def test_too_few_images_of_a_class_are_refused():
    y, s = draw(5, 200, seed=0)
    with pytest.raises(ValueError, match="fractured"):
        fit_verdict(y, s, "synthetic")


def test_a_verdict_must_be_ordered():
    with pytest.raises(ValueError, match="exceed"):
        Verdict(
            no_fracture_below=0.6,
            fracture_from=0.4,
            target_sensitivity=0.95,
            target_specificity=0.95,
            chosen_on="x",
        )
    v = Verdict(
        no_fracture_below=0.2,
        fracture_from=0.6,
        target_sensitivity=0.95,
        target_specificity=0.95,
        chosen_on="x",
    )
    assert [v.level(p) for p in (0.6, 0.59, 0.2, 0.19)] == [
        "fracture",
        "doubt",
        "doubt",
        "no_fracture",
    ]
