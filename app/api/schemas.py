"""Public shapes of the HTTP API that are not study answers (those are app.inference.answers): errors,
health, model cards, STOW-RS JSON, findings. Every route declares its response model and its
error statuses with these, so /docs shows what the service really sends."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from app.inference.answers import StoredStudyAnswer


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: str = Field(description="stable machine-readable code, e.g. undecodable_pixel_data")
    detail: str = Field(description="one human sentence")


# Every `error` code the service sends, by status: what a client branches on (README, Error codes).
ERROR_CODES: dict[int, tuple[str, ...]] = {
    400: ("empty_body", "empty_file", "no_files", "no_instances", "invalid_multipart"),
    401: ("unauthorized",),
    404: ("unknown_study", "not_found"),
    408: ("request_timeout",),
    413: ("body_too_large", "image_too_large", "too_many_images", "too_large"),
    415: ("unsupported_media_type",),
    422: (
        "undecodable_image",
        "undecodable_pixel_data",
        "invalid_dicom",
        "no_pixel_data",
        "truncated_image",
        "dimensions_exceed_data",
        "no_anatomy",
        "unsupported_modality",
        "multi_frame_unsupported",
        "unsupported_photometric",
        "out_of_scope",
        "mixed_studies",
        "unknown_classifier",
        "unknown_detector",
        "invalid_operating_point",
        "invalid_parameter",
    ),
    503: ("not_ready", "overloaded", "intake_full"),
}
ERROR_TEXT = {
    400: "malformed request",
    401: "missing or wrong API key (only when FRACTURE_API_KEYS is set)",
    404: "not found",
    408: "request body too slow",
    413: "too large",
    415: "unsupported media type",
    422: "valid syntax, unusable content (see `error`)",
    503: "not ready or overloaded; retry after Retry-After seconds",
}


def _error_model(status: int) -> type[BaseModel]:
    """ErrorBody with `error` as the enum of the codes this status carries."""
    codes = ERROR_CODES[status]
    return create_model(
        f"Error{status}",
        __doc__=f"A {status} answer: {ERROR_TEXT[status]}.",
        error=(Literal[codes], Field(description="stable machine-readable code")),  # type: ignore[valid-type]
        detail=(str, Field(description="one human sentence")),
    )


ERROR_MODELS = {status: _error_model(status) for status in ERROR_CODES}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status documented with its error codes as an enum."""
    return {s: {"model": ERROR_MODELS[s], "description": ERROR_TEXT[s]} for s in statuses}


class Live(BaseModel):
    status: Literal["alive"]


class Ready(BaseModel):
    status: Literal["ready"]
    models: dict[str, str] = Field(description="model name -> execution provider")


class ServedModel(BaseModel):
    """A model card (app.inference.model_card.ModelCard fields) with how it is served."""

    model_config = ConfigDict(extra="allow")

    role: Literal["cropper", "classifier", "detector", "orienter"]
    default: bool = Field(
        description="used when a request names no model of this role (an orienter: run on "
        "every request, FRACTURE_ORIENT)"
    )
    name: str
    version: str
    task: str
    execution_provider: str
    loaded: bool


class ModelList(BaseModel):
    models: list[ServedModel]


class StowFailure(BaseModel):
    """An instance STOW-RS refused: the DICOM failure reason and our error code and sentence."""

    sop_instance_uid: str | None
    failure_reason: int = Field(description="as in the DICOM answer's FailedSOPSequence")
    error: str = Field(description="the error code /v1/predict would answer, e.g. out_of_scope")
    detail: str


class StowJson(BaseModel):
    """STOW-RS answer for `Accept: application/json` callers."""

    request_id: str
    studies: list[StoredStudyAnswer]
    failed: int = Field(description="instances refused")
    failures: list[StowFailure] = Field([], description="each refused instance and why")


class Delivery(BaseModel):
    destination_configured: bool
    delivered: bool
    attempts: int
    last_error: str | None
    given_up: bool = Field(description="the destination refused it for good: not retried")


class Findings(StoredStudyAnswer):
    """A study's answer as kept here, with the delivery of its results."""

    delivery: Delivery
