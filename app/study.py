"""One study through the pipeline: model choice, operating point, the answer of /v1/predict.

Shared by every way a study arrives: /v1/predict, STOW-RS and the DIMSE receiver.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable

from app.core.errors import ApiError
from app.core.logs import caller
from app.inference import operating_point as op
from app.inference.answers import (
    ModelRef,
    ModelsUsed,
    OperatingPointAnswer,
    StudyAnswer,
    StudyVerdict,
)
from app.inference.decoding import DecodedImage
from app.inference.pipeline import ImageWork, decision_threshold, image_answer, image_score
from app.inference.runtime import OnnxModel
from app.state import AppState

log = logging.getLogger("app.study")
audit = logging.getLogger("app.audit")

Models = tuple[OnnxModel, OnnxModel, OnnxModel]


def _pick(state: AppState, role: str, name: str | None, default: str) -> OnnxModel:
    try:
        return state.registry.get(role, name, default)
    except KeyError:
        names = ", ".join(sorted(state.registry.by_role(role)))
        raise ApiError(
            422, f"unknown_{role}", f"no {role} named {name!r}; served: {names}"
        ) from None


def resolve_models(
    state: AppState,
    classifier: str | None,
    detector: str | None,
    fp_per_image: float | None,
    score_threshold: float | None,
) -> tuple[OnnxModel, OnnxModel, OnnxModel, op.OperatingPoint]:
    """Cropper, classifier, detector and operating point of a request; 4xx when wrong."""
    if not state.ready:
        raise ApiError(503, "not_ready", state.not_ready_reason)
    s = state.settings
    clf = _pick(state, "classifier", classifier, s.default_classifier)
    det = _pick(state, "detector", detector, s.default_detector)
    crp = _pick(state, "cropper", None, "")
    try:
        if score_threshold is not None:
            point = op.from_score(score_threshold)
        else:
            rate = s.default_fp_per_image if fp_per_image is None else fp_per_image
            point = op.from_fp_rate(det.card, rate)
    except ValueError as exc:
        raise ApiError(422, "invalid_operating_point", str(exc)) from None
    return crp, clf, det, point


Gone = Callable[[], Awaitable[bool]]


async def abandon_if_gone(gone: Gone | None, state: AppState, request_id: str) -> None:
    """Stop before spending model time on a client that has disconnected (it waited in the
    queue and gave up): counted, logged, answered with a 499 nobody reads."""
    if gone is not None and await gone():
        state.metrics.abandoned.inc()
        log.info("request %s: client gone before inference; not computed", request_id)
        raise ApiError(499, "client_closed_request", "the client disconnected")


async def analyse_study(
    state: AppState,
    works: list[ImageWork],
    point: op.OperatingPoint,
    models: Models,
    request_id: str,
    gone: Gone | None = None,
    delivery: str = "answered",
) -> StudyAnswer:
    """Run the pipeline on the decoded images of one study; the answer of /v1/predict.
    `gone` says whether the client has left: checked once a model slot is free. `delivery`
    (for the audit line): "answered" to the caller, "queued" for the PACS, or "kept" here."""
    crp, clf, det = models
    if state.batcher is None:
        raise ApiError(503, "not_ready", "the service is starting or stopping")
    # the batcher checks `gone` once the study's batch forms, before any model runs
    await state.batcher.analyse(
        works, models, point, lambda: abandon_if_gone(gone, state, request_id)
    )

    threshold = decision_threshold(clf, det)
    ori = state.batcher.orienter
    images = [image_answer(i, w, threshold) for i, w in enumerate(works)]
    for img in images:
        state.metrics.images.labels("fracture" if img.fracture else "no_fracture").inc()
    study_p = max(img.fracture_probability for img in images)
    log.info("request %s: %d image(s), study probability %.3f", request_id, len(images), study_p)
    study_uid = next(
        (w.image.study_instance_uid for w in works if w.image.study_instance_uid), None
    )
    audit.info(
        "study analysed",
        extra={
            "audit": {
                "caller": caller.get(),
                # a hash, not the UID: the audit trail links studies without identifying them
                "study": hashlib.sha256(study_uid.encode()).hexdigest()[:16] if study_uid else None,
                "models": {m.role: f"{m.name} {m.version}" for m in (*models, ori) if m},
                "fp_per_image": point.fp_per_image,
                "detector_threshold": round(point.detector_threshold, 6),
                "images": len(images),
                "probability": round(study_p, 4),
                "fracture": any(img.fracture for img in images),
                "delivery": delivery,
            }
        },
    )
    return StudyAnswer(
        request_id=request_id,
        models=ModelsUsed(
            cropper=ModelRef(name=crp.name, version=crp.version),
            classifier=ModelRef(name=clf.name, version=clf.version),
            detector=ModelRef(name=det.name, version=det.version),
            orienter=ModelRef(name=ori.name, version=ori.version) if ori else None,
        ),
        operating_point=OperatingPointAnswer(**point.as_dict()),
        decision_threshold=threshold,
        image_score=image_score(clf, det),
        images=images,
        study=StudyVerdict(
            fracture_probability=study_p,
            fracture=any(img.fracture for img in images),
            images=len(images),
        ),
    )


def file_label(index: int, filename: str | None) -> str:
    """How an error names one file of a request: its place, and its name when it had one."""
    return f"file {index}" + (f" ({filename})" if filename else "")


def refuse_mixed_studies(images: list[DecodedImage]) -> None:
    """A request is one study of one patient: DICOM files whose PatientID or StudyInstanceUID
    differ are refused (422 mixed_studies) before any model runs, naming the files (never the
    identifiers). PNG and JPEG carry neither and are taken as sent."""
    for attribute, what in (("patient_key", "patients"), ("study_instance_uid", "studies")):
        groups: dict[str, list[str]] = {}
        for i, image in enumerate(images):
            value = getattr(image, attribute)
            if value:
                groups.setdefault(value, []).append(file_label(i, image.filename))
        if len(groups) > 1:
            listed = "; ".join(", ".join(labels) for labels in groups.values())
            raise ApiError(
                422,
                "mixed_studies",
                f"the files belong to {len(groups)} different {what} ({listed}): "
                "send each study in a request of its own",
            )
