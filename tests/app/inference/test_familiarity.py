"""The out-of-distribution score: about 1 for images like the reference, higher for others, and
the same after a round trip through the file a models folder ships."""

from __future__ import annotations

import numpy as np
import pytest

from app.inference.familiarity import FeatureReference


def features(n: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """Features with a few strong directions and a weak isotropic rest, as pooled CNN features."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(42).normal(size=(128, 128)))[0]
    scales = np.r_[np.linspace(5, 1, 16), np.full(112, 0.2)]
    return (rng.normal(size=(n, 128)) * scales) @ basis.T + shift


def test_scores_are_about_one_inside_and_grow_outside(tmp_path):
    reference = FeatureReference.fit(features(2000), dims=16)
    inside = reference.score(features(500, seed=1))
    outside = reference.score(features(500, shift=1.0, seed=2))
    assert 0.8 < np.median(inside) < 1.2
    assert np.median(outside) > 3 * np.median(inside)
    threshold = np.quantile(inside, 0.95)
    assert np.mean(outside > threshold) > 0.9
    loaded = FeatureReference.load(reference.save(tmp_path / "ref.npz"))
    assert np.allclose(loaded.score(features(20, seed=3)), reference.score(features(20, seed=3)))


def test_a_direction_the_reference_never_varied_in_counts():
    """A change only in the weak directions (the residual) is seen too, not only one along the
    principal components."""
    reference = FeatureReference.fit(features(2000), dims=16)
    x = features(200, seed=4)
    basis = np.linalg.qr(np.random.default_rng(42).normal(size=(128, 128)))[0]
    pushed = x + 2.0 * basis[:, 100]  # along a weak direction
    assert np.median(reference.score(pushed)) > np.quantile(reference.score(x), 0.99)
    with pytest.raises(ValueError):
        FeatureReference.fit(np.zeros((0, 4)))


def test_the_radiograph_probe_travels_in_the_reference_file(tmp_path):
    """The probe is stored beside the PCA in one file; a file without it loads as None."""
    from app.inference.familiarity import RadiographProbe

    reference = FeatureReference.fit(features(500), dims=16)
    plain = reference.save(tmp_path / "plain.npz")
    assert RadiographProbe.load(plain) is None
    probe = RadiographProbe(np.linspace(-1, 1, 128), -0.5)
    both = probe.save_with(reference, tmp_path / "both.npz")
    loaded = RadiographProbe.load(both)
    x = features(10, seed=5)
    assert np.allclose(loaded.logit(x), x @ np.linspace(-1, 1, 128) - 0.5)
    assert np.allclose(FeatureReference.load(both).score(x), reference.score(x))


def test_refusal_needs_the_flag_and_the_probe_together():
    """A radiograph probe past its limit refuses only an image the PCA flags too; ood_score
    beyond refuse_above refuses on its own; each refusal says why."""
    from app.inference.plan import Scoring

    scoring = Scoring(
        None, 0.5, "test", ood_threshold=2.0, ood_refuse_above=18.0, probe_refuse_above=4.5
    )
    assert scoring.unreadable(1.5, 9.0) is None  # familiar: a radiograph, whatever the probe
    assert scoring.unreadable(6.0, 3.0) is None  # flagged, but the probe calls it a radiograph
    assert scoring.unreadable(None, None) is None
    reason = scoring.unreadable(6.0, 9.0)
    assert reason and "no radiograph" in reason and "9" in reason
    assert "ood_score" in (scoring.unreadable(20.0, None) or "")
