"""The answer of one analysed study, typed: what /v1/predict returns, what STOW-RS and C-STORE
keep, and what the DICOM results are built from (with the exact boxes in `ImageWork`).

Boxes are xyxy in the pixel frame of the image as uploaded (after EXIF orientation for JPEG).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer


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
    fracture: bool = Field(description="fracture_probability >= decision_threshold")
    detections: list[Detection]
    timings_ms: dict[str, float]


class StudyVerdict(BaseModel):
    fracture_probability: float = Field(ge=0, le=1, description="max over the study's images")
    fracture: bool = Field(description="any image decided as fractured")
    images: int


class StudyAnswer(BaseModel):
    """The answer of /v1/predict: per image and per study."""

    request_id: str
    models: ModelsUsed
    operating_point: OperatingPointAnswer
    decision_threshold: float = Field(
        description="threshold of fracture_probability: the classifier card's, or its fusion's"
        " with this detector"
    )
    image_score: str = Field(
        "",
        description="how fracture_probability is made: the classifier's calibrated probability,"
        " or its fusion with the detector's best box (Xie et al.), calibrated",
    )
    images: list[ImageResult]
    study: StudyVerdict


class StoredStudyVerdict(StudyVerdict):
    study_instance_uid: str


class StoredStudyAnswer(StudyAnswer):
    """A study that arrived as DICOM (STOW-RS or C-STORE): its answer, kept with its results."""

    study: StoredStudyVerdict
    result_id: str = Field(description="this analysis")
    results_url: str = Field(description="WADO-RS URL of our SR and secondary captures")
