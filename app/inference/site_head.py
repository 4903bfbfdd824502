"""A site's own last layer for the classifier (`python -m training adapt`): a logistic regression
on the base classifier's logit and its pooled features (the familiarity output), fitted on the
site's labelled images mixed with FracAtlas training images so that neither is forgotten.

Retraining the last layer on the new domain's images is what recovers most of a shift when the
features still separate the classes (Kirichenko et al., "Last layer re-training is sufficient for
robustness to spurious correlations", ICLR 2023): seconds on a CPU, no backbone to ship, and the
base model's own probability stays one of its inputs. Its output replaces the classifier's raw
probability before the fusion and calibration the adapted card carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


@dataclass(frozen=True)
class SiteHead:
    """p' = sigmoid(base_weight * logit(p) + weights . (features - mean) / scale + bias)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    base_weight: float
    bias: float

    def inputs(self, raw: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The design matrix the head was fitted on: [logit(p), standardised features]."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return np.column_stack([logit(raw), z])

    def apply(self, raw: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The adapted raw probability of each image (N,) from its base raw probability and its
        pooled features (N x D)."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        score = self.base_weight * logit(raw) + z @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-score))

    def save(self, path: Path) -> Path:
        np.savez(
            path,
            mean=self.mean,
            scale=self.scale,
            weights=self.weights,
            base_weight=np.float64(self.base_weight),
            bias=np.float64(self.bias),
        )
        return path

    @classmethod
    def load(cls, path: Path) -> SiteHead:
        with np.load(path) as f:
            return cls(
                f["mean"].astype(np.float64),
                f["scale"].astype(np.float64),
                f["weights"].astype(np.float64),
                float(f["base_weight"]),
                float(f["bias"]),
            )
