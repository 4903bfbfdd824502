"""How unlike an image is to the images the models were validated on: an out-of-distribution
score on the classifier's own pooled features.

The reference is a probabilistic PCA of the pooled features of the training crops (the served
crops, averaged over the card's test-time views): `ood_score` is the Mahalanobis distance in the
top principal directions plus the residual outside them, per feature dimension (so about 1 for an
image like the training images, higher the less like them). An image scoring above the card's
threshold (the 95th percentile of FracAtlas val) is flagged `out_of_distribution`: its answer
holds under conditions nobody validated. A models folder carries its own reference, so a site's
adapted models are measured against the images they saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The note an answer carries for a flagged image (the SR, the capture and the viewer say it too).
OUTSIDE_NOTE = "outside validated conditions: unlike the images the models were validated on"


@dataclass(frozen=True)
class FeatureReference:
    """Probabilistic PCA of reference features: mean (D), components (K x D, orthonormal rows),
    variances along them (K) and the mean variance of the residual (per remaining dimension)."""

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float

    @classmethod
    def fit(cls, features: np.ndarray, dims: int = 64) -> FeatureReference:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"a reference needs at least 2 feature rows, got shape {x.shape}")
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s**2 / max(len(x) - 1, 1)
        k = min(dims, len(var) - 1)
        rest = var[k:]
        residual = float(rest.sum() / max(x.shape[1] - k, 1)) if len(rest) else 1e-6
        return cls(mean, vt[:k], np.maximum(var[:k], 1e-12), max(residual, 1e-12))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Per row: squared Mahalanobis distance in the principal subspace plus the residual's
        squared norm over the residual variance, divided by the feature dimension."""
        x = np.asarray(features, dtype=np.float64) - self.mean
        squares = (x @ self.components.T) ** 2
        inside = (squares / self.variances).sum(axis=1)
        residual = (x**2).sum(axis=1) - squares.sum(axis=1)
        outside = np.maximum(residual, 0.0) / self.residual_variance
        return (inside + outside) / x.shape[1]

    def save(self, path: Path, **extra: np.ndarray | float) -> Path:
        """The reference's file; `extra` arrays (a probe's) stored beside it."""
        np.savez(
            path,
            mean=self.mean.astype(np.float32),
            components=self.components.astype(np.float32),
            variances=self.variances.astype(np.float64),
            residual_variance=np.float64(self.residual_variance),
            **extra,
        )
        return path

    @classmethod
    def load(cls, path: Path) -> FeatureReference:
        with np.load(path) as f:
            return cls(
                f["mean"].astype(np.float64),
                f["components"].astype(np.float64),
                f["variances"].astype(np.float64),
                float(f["residual_variance"]),
            )


@dataclass(frozen=True)
class RadiographProbe:
    """A linear probe on the same pooled features: its logit is high for an image that is no
    radiograph at all (a page of text, an editor, a window, a chart, a photograph) and low for
    radiographs, shifted ones included (training/familiarity.py fits it). Stored in the
    reference's file, beside the PCA."""

    weights: np.ndarray
    bias: float

    def logit(self, features: np.ndarray) -> np.ndarray:
        """Per row: the log-odds that the image is no radiograph."""
        return np.asarray(features, dtype=np.float64) @ self.weights + self.bias

    def save_with(self, reference: FeatureReference, path: Path) -> Path:
        """The reference's file with this probe in it."""
        return reference.save(
            path, probe_weights=self.weights.astype(np.float64), probe_bias=np.float64(self.bias)
        )

    @classmethod
    def load(cls, path: Path) -> RadiographProbe | None:
        """The probe in a reference's file (None: a reference fitted without one)."""
        with np.load(path) as f:
            if "probe_weights" not in f:
                return None
            return cls(f["probe_weights"].astype(np.float64), float(f["probe_bias"]))
