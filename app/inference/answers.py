"""The answer of one analysed study, typed: what /v1/predict returns, what STOW-RS and C-STORE
keep, and what the DICOM results are built from (with the exact boxes in `ImageWork`).

Boxes are xyxy in the pixel frame of the image as uploaded (after EXIF orientation for JPEG).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from app.inference.model_card import VerdictLevel


def _two_level_verdict(data: Any) -> Any:
    """Answers stored before the three-level verdict (results kept in the database) carry only
    `fracture`: read as fracture / no_fracture, as they were judged."""
    if isinstance(data, dict) and "verdict" not in data and "fracture" in data:
        return {**data, "verdict": "fracture" if data["fracture"] else "no_fracture"}
    return data


class ModelRef(BaseModel):
    name: str
    version: str


class ModelsUsed(BaseModel):
    cropper: ModelRef
    classifier: ModelRef
    detector: ModelRef
    orienter: ModelRef | None = Field(
        None,
        description="the quarter-turn model, when the service runs one (FRACTURE_ORIENT); "
        "absent otherwise",
    )

    @model_serializer(mode="wrap")
    def _orienter_only_when_used(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # absent rather than null when off, so the answer of the default service keeps its keys
        out = handler(self)
        if out.get("orienter") is None:
            out.pop("orienter", None)
        return out


class OperatingPointAnswer(BaseModel):
    fp_per_image: float | None = Field(
        description="requested false positives per image; null when score_threshold was given"
    )
    detector_threshold: float = Field(description="detector score threshold applied")
    expected_recall: float | None = Field(
        description="lesion recall the detector card promises at this point (val split)"
    )


class Detection(BaseModel):
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels")
    score: float
    label: Literal["fracture"] = "fracture"


class ImageResult(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _stored_before_the_verdict(cls, data: Any) -> Any:
        return _two_level_verdict(data)

    index: int = Field(description="position of the image in the request")
    filename: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    source: str = Field(description="dicom, png or jpeg")
    width: int
    height: int
    pixel_spacing: list[float] | None = Field(description="mm per pixel (row, column), DICOM only")
    crop_box: list[int] = Field(min_length=4, max_length=4, description="bone crop, x1 y1 x2 y2")
    crop_fallback: bool = Field(description="true when the bone mask was empty: whole image used")
    notes: list[str] = Field(description="what the service noticed about this image")
    fracture_probability: float = Field(ge=0, le=1)
    verdict: VerdictLevel = Field(
        description="fracture (fracture_probability >= verdict_thresholds.fracture_from, chosen "
        "for high specificity), no_fracture (below verdict_thresholds.no_fracture_below, chosen "
        "for high sensitivity) or doubt (between); fracture / no_fracture at decision_threshold "
        "when the classifier card has no verdict thresholds"
    )
    fracture: bool = Field(
        description="verdict is fracture: fracture_probability >= decision_threshold"
    )
    ood_score: float | None = Field(
        None,
        description="how unlike the images the models were validated on (about 1 for FracAtlas "
        "images, higher the less alike); null when the classifier card has no reference",
    )
    out_of_distribution: bool | None = Field(
        None,
        description="ood_score above the card's threshold (which passes 95% of FracAtlas val): "
        "the answer holds under conditions nobody validated",
    )
    detections: list[Detection]
    timings_ms: dict[str, float]


class NotAnalysed(BaseModel):
    """A file of a multi-image request that was not analysed, and why (the error it would get
    alone); the study's answer comes from the others."""

    index: int = Field(description="position of the file in the request")
    filename: str | None
    error: str = Field(description="the error code, as in an error body")
    detail: str


class StudyVerdict(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _stored_before_the_verdict(cls, data: Any) -> Any:
        return _two_level_verdict(data)

    fracture_probability: float = Field(ge=0, le=1, description="max over the study's images")
    verdict: VerdictLevel = Field(
        description="fracture when any image is, else doubt when any image is, else no_fracture"
    )
    fracture: bool = Field(description="any image decided as fractured")
    images: int
    out_of_distribution: bool = Field(
        False, description="any image outside validated conditions (out_of_distribution)"
    )


class VerdictThresholds(BaseModel):
    no_fracture_below: float = Field(ge=0, le=1)
    fracture_from: float = Field(ge=0, le=1)
    target_sensitivity: float = Field(description="of fracture or doubt, on new images")
    target_specificity: float = Field(description="of fracture, on new images")


class StudyAnswer(BaseModel):
    """The answer of /v1/predict: per image and per study."""

    request_id: str
    models: ModelsUsed
    operating_point: OperatingPointAnswer
    decision_threshold: float = Field(
        description="threshold of fracture_probability: the classifier card's, or its fusion's"
        " with this detector"
    )
    verdict_thresholds: VerdictThresholds | None = Field(
        None,
        description="the three-level verdict's thresholds of fracture_probability (the classifier "
        "card's for this score); null when it has none",
    )
    image_score: str = Field(
        "",
        description="how fracture_probability is made: the classifier's calibrated probability,"
        " or its fusion with the detector's best box (Xie et al.), calibrated",
    )
    images: list[ImageResult]
    not_analysed: list[NotAnalysed] = Field(
        default_factory=list,
        description="files of the request refused one by one (undecodable, out of scope, no "
        "radiograph); the study's answer is from `images`",
    )
    study: StudyVerdict


class StoredStudyVerdict(StudyVerdict):
    study_instance_uid: str


class StoredStudyAnswer(StudyAnswer):
    """A study that arrived as DICOM (STOW-RS or C-STORE): its answer, kept with its results."""

    study: StoredStudyVerdict
    result_id: str = Field(description="this analysis")
    results_url: str = Field(description="WADO-RS URL of our SR and secondary captures")
