"""One study's rules and answer, shared by every door (/v1/predict, STOW-RS, C-STORE): one
patient per request, how an error names a file, and the answer assembled from the analysed
images under their plan."""

from __future__ import annotations

from app.core.errors import ApiError
from app.inference.answers import (
    ModelRef,
    ModelsUsed,
    NotAnalysed,
    OperatingPointAnswer,
    StudyAnswer,
    StudyVerdict,
    VerdictThresholds,
)
from app.inference.decoding import DecodedImage
from app.inference.pipeline import ImageWork, image_answer
from app.inference.plan import Plan
from app.inference.runtime import OnnxModel


def _ref(model: OnnxModel) -> ModelRef:
    return ModelRef(name=model.name, version=model.version)


def study_answer(
    works: list[ImageWork],
    plan: Plan,
    request_id: str,
    not_analysed: list[NotAnalysed] | None = None,
) -> StudyAnswer:
    """The answer of /v1/predict for the analysed images of one study: each image judged by the
    plan's scoring; the study's probability is its images' highest."""
    images = [
        image_answer(i if w.index is None else w.index, w, plan.scoring)
        for i, w in enumerate(works)
    ]
    levels = {img.verdict for img in images}
    ori, verdict = plan.orienter, plan.scoring.verdict
    return StudyAnswer(
        request_id=request_id,
        models=ModelsUsed(
            cropper=_ref(plan.cropper),
            classifier=_ref(plan.classifier),
            detector=_ref(plan.detector),
            orienter=_ref(ori) if ori else None,
        ),
        operating_point=OperatingPointAnswer(**plan.point.as_dict()),
        decision_threshold=plan.scoring.decision_threshold,
        verdict_thresholds=VerdictThresholds(
            **verdict.model_dump(include=set(VerdictThresholds.model_fields))
        )
        if verdict
        else None,
        image_score=plan.scoring.description,
        images=images,
        not_analysed=not_analysed or [],
        study=StudyVerdict(
            fracture_probability=max(img.fracture_probability for img in images),
            verdict=next(v for v in ("fracture", "doubt", "no_fracture") if v in levels),
            fracture=any(img.fracture for img in images),
            images=len(images),
            out_of_distribution=any(img.out_of_distribution for img in images),
        ),
    )


def file_label(index: int, filename: str | None) -> str:
    """How an error names one file of a request: its place, and its name when it had one."""
    return f"file {index}" + (f" ({filename})" if filename else "")


def refuse_unreadable(
    works: list[ImageWork], plan: Plan
) -> tuple[list[ImageWork], list[NotAnalysed]]:
    """Split off the images the classifier card's familiarity says are no radiograph the models
    can read (a screenshot, a photograph, a document): ood_score beyond `refuse_above`, or
    flagged with the radiograph probe beyond `probe_refuse_above`. 422 out_of_scope when none
    is left."""
    kept, refused = [], []
    for i, w in enumerate(works):
        reason = plan.scoring.unreadable(w.ood_score, w.probe_logit)
        if reason:
            detail = f"{reason}: not analysed"
            index = i if w.index is None else w.index
            refused.append(
                NotAnalysed(
                    index=index, filename=w.image.filename, error="out_of_scope", detail=detail
                )
            )
        else:
            kept.append(w)
    if not kept:
        first = refused[0]
        label = file_label(first.index, first.filename) if len(works) > 1 or first.filename else ""
        raise ApiError(422, "out_of_scope", f"{label}: {first.detail}" if label else first.detail)
    return kept, refused


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
