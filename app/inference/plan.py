"""What one study is analysed with, decided once before any model runs: the models, the operating
point, the optional stages, and how the image score is made and judged (the Scoring).

The service resolves a Plan per request; evaluation, calibration and the benchmark resolve theirs
with the same function, so every one of them runs what the service runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.core.config import PipelineOptions, Settings
from app.core.errors import ApiError
from app.inference import operating_point as op
from app.inference.model_card import Fusion, Verdict, VerdictLevel
from app.inference.runtime import ModelRegistry, OnnxModel


def image_score_fusion(classifier: OnnxModel, detector: OnnxModel) -> Fusion | None:
    """The classifier card's fusion when it was fitted for this very detector file, else None
    (the classifier's own probability serves)."""
    fusion = classifier.card.fusion if classifier.card else None
    return fusion if fusion is not None and fusion.applies_to(detector.card) else None


def _ood_limits(classifier: OnnxModel) -> tuple[float | None, float | None, float | None]:
    """The classifier card's familiarity thresholds: flag above, refuse above, and refuse a
    flagged image above the radiograph probe's logit."""
    card = classifier.card
    if card is None or card.familiarity is None:
        return None, None, None
    f = card.familiarity
    return f.threshold, f.refuse_above, f.probe_refuse_above


@dataclass(frozen=True)
class Scoring:
    """How an image's fracture_probability is made (the classifier's calibrated probability, or
    its fusion with the detector's best box) and how it is judged: by the card's three-level
    verdict when it has one for this score (`fracture` from its high-specificity threshold,
    which is then the decision threshold), else fracture / no fracture at the decision
    threshold."""

    fusion: Fusion | None
    decision_threshold: float
    description: str
    verdict: Verdict | None = None
    ood_threshold: float | None = None  # the classifier card's familiarity threshold
    ood_refuse_above: float | None = None  # beyond it: no radiograph the models can read
    probe_refuse_above: float | None = None  # a flagged image beyond it: no radiograph at all

    @classmethod
    def of(cls, classifier: OnnxModel, detector: OnnxModel) -> Scoring:
        fusion = image_score_fusion(classifier, detector)
        if fusion is None:
            card = classifier.card
            verdict = card.verdict if card else None
            threshold = float(card.decision_threshold) if card else 0.5
            return cls(
                None,
                verdict.fracture_from if verdict else threshold,
                f"{classifier.name}, calibrated",
                verdict,
                *_ood_limits(classifier),
            )
        w = fusion.classifier_weight
        return cls(
            fusion,
            fusion.verdict.fracture_from if fusion.verdict else fusion.decision_threshold,
            f"{w:g} x {classifier.name} + {1 - w:g} x max box of {detector.name}, calibrated",
            fusion.verdict,
            *_ood_limits(classifier),
        )

    def unfamiliar(self, ood_score: float | None) -> bool:
        """Whether an image scored this far from the validated images is flagged."""
        return (
            ood_score is not None
            and self.ood_threshold is not None
            and ood_score > self.ood_threshold
        )

    def unreadable(self, ood_score: float | None, probe_logit: float | None = None) -> str | None:
        """Why an image is no radiograph the models can read (refused), or None: its ood_score
        beyond every radiograph's, or flagged with the radiograph probe past its limit."""
        limit = self.ood_refuse_above
        if ood_score is not None and limit is not None and ood_score > limit:
            return (
                "the image does not look like a radiograph the models can read (ood_score "
                f"{ood_score:.3g} above {limit:.3g})"
            )
        probe = self.probe_refuse_above
        flagged = self.unfamiliar(ood_score)
        if flagged and probe is not None and probe_logit is not None and probe_logit > probe:
            return (
                "the image looks like no radiograph (a page, a screen, a chart or a photograph: "
                f"radiograph probe {probe_logit:.3g} above {probe:.3g}, ood_score {ood_score:.3g})"
            )
        return None

    def level(self, probability: float) -> VerdictLevel:
        """fracture, doubt or no_fracture for one image's fracture_probability."""
        if self.verdict is not None:
            return self.verdict.level(probability)
        return "fracture" if probability >= self.decision_threshold else "no_fracture"


@dataclass(frozen=True)
class Plan:
    """The models, operating point, optional stages and scoring of one study."""

    cropper: OnnxModel
    classifier: OnnxModel
    detector: OnnxModel
    point: op.OperatingPoint
    scoring: Scoring
    orienter: OnnxModel | None = None
    options: PipelineOptions = PipelineOptions()

    @classmethod
    def of(
        cls,
        cropper: OnnxModel,
        classifier: OnnxModel,
        detector: OnnxModel,
        point: op.OperatingPoint,
        orienter: OnnxModel | None = None,
        options: PipelineOptions = PipelineOptions(),
    ) -> Plan:
        """A plan whose scoring follows from the classifier and detector cards as they are now."""
        scoring = Scoring.of(classifier, detector)
        return cls(cropper, classifier, detector, point, scoring, orienter, options)

    @property
    def models(self) -> tuple[OnnxModel, ...]:
        """Every model the plan runs (the orienter only when it runs)."""
        return (self.cropper, self.classifier, self.detector) + (
            (self.orienter,) if self.orienter else ()
        )

    @property
    def batch_key(self) -> tuple[int, ...]:
        """Studies whose plans share this key can run in one batch."""
        return (*(id(m) for m in self.models), hash(self.options), hash(self.point))


def _pick(registry: ModelRegistry, role: str, name: str | None, default: str) -> OnnxModel:
    try:
        return registry.get(role, name, default)
    except KeyError:
        names = ", ".join(sorted(registry.by_role(role)))
        raise ApiError(
            422, f"unknown_{role}", f"no {role} named {name!r}; served: {names}"
        ) from None


def operating_point(
    detector: OnnxModel,
    settings: Settings,
    fp_per_image: float | None = None,
    score_threshold: float | None = None,
) -> op.OperatingPoint:
    """The detector's point for a requested FP rate (the default when none) or an explicit score
    threshold; 422 invalid_operating_point outside what the card covers."""
    try:
        if score_threshold is not None:
            return op.from_score(score_threshold)
        rate = settings.default_fp_per_image if fp_per_image is None else fp_per_image
        return op.from_fp_rate(detector.card, rate)
    except ValueError as exc:
        raise ApiError(422, "invalid_operating_point", str(exc)) from None


def resolve_plan(
    registry: ModelRegistry,
    settings: Settings,
    classifier: str | None = None,
    detector: str | None = None,
    fp_per_image: float | None = None,
    score_threshold: float | None = None,
) -> Plan:
    """The plan of a request to a service configured by `settings` with these models: the named
    models or the defaults, the requested operating point, the optional stages `settings` switch
    on (the orienter among them); 422 naming what is wrong."""
    clf = _pick(registry, "classifier", classifier, settings.default_classifier)
    det = _pick(registry, "detector", detector, settings.default_detector)
    crp = _pick(registry, "cropper", None, "")
    options = settings.pipeline_options()
    point = operating_point(det, settings, fp_per_image, score_threshold)
    return Plan.of(crp, clf, det, point, registry.orienter(options.orient), options)
