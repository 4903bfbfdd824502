"""The model card: the one contract between training (writes it) and serving (reads it).

A card is validated when training writes it and when the service loads it, so a bad card fails
at start-up (not ready, naming the file) instead of as a KeyError inside a request. Serving reads
every model parameter from here: the input spec, the detector's post-processing kind and NMS IoU,
the operating-point table (which also bounds the accepted fp_per_image), the classifier's
decision threshold and the cropper's margin. Provenance, metrics and recipe are free blocks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Task = Literal["segmentation", "classification", "detection", "orientation"]
ROLES: dict[str, str] = {
    "segmentation": "cropper",
    "classification": "classifier",
    "detection": "detector",
    "orientation": "orienter",
}
# Roles the service cannot run without; an orienter is used only when FRACTURE_ORIENT is on.
REQUIRED_ROLES: tuple[str, ...] = ("cropper", "classifier", "detector")
# Detector output decoders the service implements (app.inference.postprocess), by card `output.postprocess`.
Postprocess = Literal["yolo", "rcnn"]
# The FROC rows every detector card carries (the service's default is one of them).
FP_RATES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_CROP_MARGIN = 0.05


class CardError(ValueError):
    """A model card that cannot be served; the message names the file."""


class InputSpec(BaseModel):
    """How a crop becomes the model's input tensor (app.inference.preprocessing.model_input)."""

    model_config = ConfigDict(extra="forbid")

    size: tuple[int, int] = Field(description="input height and width in pixels")
    resize: Literal["letterbox", "stretch"]
    pad_value: float = Field(0.0, description="letterbox padding, in [0, 1] grey")
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    batch: bool = Field(True, description="False: the graph takes one CHW image")
    tta: Literal["none", "rot4", "d4"] = Field(
        "none",
        description="classifier test-time views whose mean logit is the score: rot4 the four "
        "quarter turns, d4 those and their mirrors (a score that ignores the orientation)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if min(self.size) < 1:
            raise ValueError(f"input size must be positive, got {self.size}")
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError("mean and std need one value per channel")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")
        return self


class DetectorOutput(BaseModel):
    """What a detector graph emits and how the service decodes it."""

    model_config = ConfigDict(extra="allow")  # plus a description per output tensor

    postprocess: Postprocess
    nms_iou: float | None = Field(None, gt=0, le=1, description="NMS IoU of the yolo decoder")

    @model_validator(mode="after")
    def _yolo_has_iou(self) -> DetectorOutput:
        if self.postprocess == "yolo" and self.nms_iou is None:
            raise ValueError("a yolo detector card needs output.nms_iou")
        return self


class OperatingPointRow(BaseModel):
    """One FROC row calibrated on val: the lowest threshold with mean FP/image <= the target."""

    model_config = ConfigDict(extra="allow")

    fp_per_image: float = Field(gt=0)
    threshold: float = Field(ge=0, le=1)
    recall: float = Field(ge=0, le=1)
    precision: float | None = None
    achieved_fp_per_image: float | None = None


class Calibration(BaseModel):
    """Platt scaling of a classifier's probability: p' = sigmoid(slope * logit(p) + intercept),
    fitted on labelled images run through the served pipeline. Monotone: AUROC is unchanged,
    the probability reads as a frequency on the images it was fitted on."""

    model_config = ConfigDict(extra="allow")

    method: Literal["platt"] = "platt"
    slope: float
    intercept: float
    fitted_on: str = Field(description="which images, how many, through which pipeline")

    def apply(self, p: float) -> float:
        q = min(max(float(p), 1e-7), 1 - 1e-7)
        z = self.slope * math.log(q / (1 - q)) + self.intercept
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def fused_score(p: Any, max_box: Any, classifier_weight: float) -> Any:
    """Xie et al.'s image score before calibration: classifier_weight * p + (1 -
    classifier_weight) * max_box (floats or numpy arrays)."""
    return classifier_weight * p + (1 - classifier_weight) * max_box


VerdictLevel = Literal["fracture", "doubt", "no_fracture"]


class Verdict(BaseModel):
    """The three-level verdict on the served image score, as fracture triage gives it: at or
    above `fracture_from` fracture (chosen for high specificity), below `no_fracture_below` no
    fracture (chosen for high sensitivity), doubt between. Each threshold is the bootstrap bound
    of its rule on the images it was fitted on, not the point, so that it holds on new images."""

    model_config = ConfigDict(extra="allow")

    no_fracture_below: float = Field(ge=0, le=1)
    fracture_from: float = Field(ge=0, le=1)
    target_sensitivity: float = Field(gt=0, lt=1, description="of fracture or doubt")
    target_specificity: float = Field(gt=0, lt=1, description="of fracture")
    no_fracture_below_ci95: tuple[float, float] | None = None
    fracture_from_ci95: tuple[float, float] | None = None
    chosen_on: str = Field(description="which images, through which pipeline, which rule")

    @model_validator(mode="after")
    def _ordered(self) -> Verdict:
        if self.no_fracture_below > self.fracture_from:
            raise ValueError("no_fracture_below must not exceed fracture_from")
        return self

    def level(self, p: float) -> VerdictLevel:
        if p >= self.fracture_from:
            return "fracture"
        return "no_fracture" if p < self.no_fracture_below else "doubt"


class Fusion(BaseModel):
    """Xie et al.'s image score with one detector file: s = classifier_weight * p + (1 -
    classifier_weight) * m, p the classifier's uncalibrated probability, m the highest score of any
    box the detector finds in the crop (0 without one); then its own calibration and decision
    threshold. Served when a request's detector is this very file (name and sha256); with any
    other detector the classifier's own calibration and threshold serve."""

    model_config = ConfigDict(extra="allow")

    detector: str
    detector_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    classifier_weight: float = Field(gt=0, le=1)
    calibration: Calibration | None = None
    decision_threshold: float = Field(ge=0, le=1, description="on the calibrated fused score")
    chosen_on: str = Field(description="how the weight was chosen, on which images")
    verdict: Verdict | None = Field(None, description="three-level verdict on the fused score")

    def applies_to(self, detector: ModelCard | None) -> bool:
        return detector is not None and (detector.name, detector.sha256) == (
            self.detector,
            self.detector_sha256,
        )

    def apply(self, p: float, max_box: float) -> float:
        s = fused_score(float(p), float(max_box), self.classifier_weight)
        return self.calibration.apply(s) if self.calibration else s


class Familiarity(BaseModel):
    """The classifier's out-of-distribution reference (app/inference/familiarity.py): which graph
    tensor holds its pooled features, the reference file fitted on the training crops, and the
    score above which an image is flagged."""

    model_config = ConfigDict(extra="allow")

    feature_output: str = Field(description="graph tensor of the pooled features (N x D)")
    file: str = Field(description="the reference (.npz) in the models folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    threshold: float = Field(gt=0, description="ood_score above it: out_of_distribution")
    refuse_above: float | None = Field(
        None, gt=0, description="ood_score above it: no radiograph the models can read, refused"
    )
    probe_refuse_above: float | None = Field(
        None,
        description="the radiograph probe's logit above it (the reference file holds the probe), "
        "with the image flagged: no radiograph at all, refused",
    )
    fitted_on: str
    threshold_rule: str


class SiteAdaptation(BaseModel):
    """Where a card was adapted (`python -m training adapt`): the site, its images (count and a
    digest of their list), the base models, the paired figures, and for a classifier the site's
    last layer (app/inference/site_head.py) when it passed the guard; a fine-tuned detector's
    weights are its graph itself."""

    model_config = ConfigDict(extra="allow")

    site: str
    created: str
    images: int = Field(ge=1)
    fractured: int = Field(ge=0)
    images_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    base: dict[str, Any]
    method: str
    figures: dict[str, Any]
    file: str | None = Field(None, description="the site head (.npz); none: recalibration only")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class ModelCard(BaseModel):
    """A shipped model: identity, file, input contract, role-specific serving parameters."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str
    task: Task
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: InputSpec
    output: dict[str, Any]
    data: str
    licence: str
    recipe: dict[str, Any]
    metrics: dict[str, Any]
    decision_threshold: float | None = Field(None, ge=0, le=1)
    operating_points: list[OperatingPointRow] | None = None
    crop_margin: float | None = Field(None, ge=0, le=0.5)
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="an orienter's: the turn probability it acts on"
    )
    calibration: Calibration | None = None
    verdict: Verdict | None = Field(
        None, description="three-level verdict on the classifier's own calibrated probability"
    )
    fusion: Fusion | None = None
    familiarity: Familiarity | None = None
    site_adaptation: SiteAdaptation | None = None
    site: str | None = Field(None, description="site calibration applied over the shipped card")

    @model_validator(mode="before")
    @classmethod
    def _version_as_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("version"), int | float):
            data = {**data, "version": str(data["version"])}
        return data

    @model_validator(mode="after")
    def _role_fields(self) -> ModelCard:
        if self.task == "classification" and self.decision_threshold is None:
            raise ValueError("a classifier card needs decision_threshold")
        classifier_only = (self.calibration, self.fusion, self.verdict, self.familiarity)
        if any(f is not None for f in classifier_only) and self.task != "classification":
            raise ValueError(
                "only a classifier card carries a calibration, verdict, fusion or familiarity"
            )
        if self.site_adaptation is not None and self.task not in ("classification", "detection"):
            raise ValueError("only a classifier or detector card carries a site_adaptation")
        if (
            self.site_adaptation is not None
            and self.site_adaptation.file
            and self.task != ("classification")
        ):
            raise ValueError("only a classifier card carries a site head file")
        if self.task == "segmentation" and self.crop_margin is None:
            raise ValueError("a cropper card needs crop_margin")
        if self.task == "orientation" and self.min_confidence is None:
            raise ValueError("an orienter card needs min_confidence")
        if self.task == "detection":
            DetectorOutput.model_validate(self.output)
            rows = self.operating_points or []
            rates = [r.fp_per_image for r in rows]
            if len(rows) < 2 or rates != sorted(set(rates)):
                raise ValueError("a detector card needs >= 2 operating points, fp_per_image rising")
        return self

    @property
    def role(self) -> str:
        return ROLES[self.task]

    @property
    def detector_output(self) -> DetectorOutput:
        return DetectorOutput.model_validate(self.output)

    @property
    def fp_range(self) -> tuple[float, float]:
        """The fp_per_image values this detector's table covers (requests outside: 422)."""
        rates = [r.fp_per_image for r in self.operating_points or []]
        return min(rates), max(rates)

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def validate_card(card: dict[str, Any], source: str) -> ModelCard:
    """A card dict as a ModelCard; CardError naming `source` and every problem otherwise."""
    try:
        return ModelCard.model_validate(card)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'card'}: {e['msg']}" for e in exc.errors()
        )
        raise CardError(f"model card {source} is invalid: {problems}") from None


def read_card(path: Path) -> ModelCard:
    """Read and validate one card file; CardError naming the file when it cannot be served."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"model card {path.name} cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise CardError(f"model card {path.name} is not a JSON object")
    return validate_card(raw, path.name)


class SiteClassifier(BaseModel):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    calibration: Calibration | None = None
    decision_threshold: float = Field(ge=0, le=1, description="on the calibrated probability")
    verdict: Verdict | None = None
    fusion: Fusion | None = None


class SiteDetector(BaseModel):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    operating_points: list[OperatingPointRow]


class SiteCalibration(BaseModel):
    """A site's own operating points, fitted on its labelled images by
    `python -m training calibrate --folder ...`, loaded over the shipped cards
    (FRACTURE_SITE_CALIBRATION). Each entry names the exact model file (sha256) it was fitted for."""

    site: str
    created: str
    images: int = Field(ge=1)
    fractured: int = Field(ge=0)
    classifier: SiteClassifier | None = None
    detector: SiteDetector | None = None

    def update_for(self, name: str, sha256: str) -> dict[str, Any] | None:
        """The card fields this site fitted for model `name` (None: not calibrated here);
        CardError when they were fitted for another file of that model."""
        for entry in (self.classifier, self.detector):
            if entry is None or entry.name != name:
                continue
            if entry.sha256 != sha256:
                raise CardError(
                    f"site calibration {self.site!r} was fitted for another file of {name}"
                )
            return entry.model_dump(mode="json", exclude={"name", "sha256"})
        return None

    def overlay(self, card: ModelCard) -> ModelCard:
        """The card with this site's values where the site calibrated this very model."""
        update = self.update_for(card.name, card.sha256)
        if update is None:
            return card
        return validate_card({**card.as_json(), **update, "site": self.site}, card.file)


def read_site_calibration(path: Path) -> SiteCalibration:
    try:
        return SiteCalibration.model_validate_json(path.read_text())
    except (OSError, ValueError) as exc:
        raise CardError(f"site calibration {path.name} cannot be used: {exc}") from None
