"""Public shapes of the HTTP API that are not study answers (those are app.inference.answers): errors,
health, model cards, STOW-RS JSON, findings. Every route declares its response model and its
error statuses with these, so /docs shows what the service really sends."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.inference.answers import StoredStudyAnswer


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: str = Field(description="stable machine-readable code, e.g. undecodable_pixel_data")
    detail: str = Field(description="one human sentence")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status documented with the ErrorBody shape."""
    text = {
        400: "malformed request",
        401: "missing or wrong API key",
        404: "not found",
        408: "request body too slow",
        413: "too large",
        415: "unsupported media type",
        422: "valid syntax, unusable content (see `error`)",
        503: "not ready or overloaded",
    }
    return {s: {"model": ErrorBody, "description": text.get(s, "error")} for s in statuses}


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


class StowJson(BaseModel):
    """STOW-RS answer for `Accept: application/json` callers."""

    request_id: str
    studies: list[StoredStudyAnswer]
    failed: int = Field(description="instances refused (see the DICOM answer for reasons)")


class Delivery(BaseModel):
    destination_configured: bool
    delivered: bool
    attempts: int
    last_error: str | None
    given_up: bool = Field(description="the destination refused it for good: not retried")


class Findings(StoredStudyAnswer):
    """A study's answer as kept here, with the delivery of its results."""

    delivery: Delivery
