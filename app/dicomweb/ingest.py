"""DICOM instances in, findings and result objects out: what STOW-RS and C-STORE share.

Failure reasons (DICOM status codes, the same for STOW-RS FailureReason and C-STORE status):
0xA900 study UID mismatch, 0x0122 SOP class or modality not supported, 0xC000 cannot
understand (not DICOM, undecodable pixel data), 0xA700 out of resources (over the pixel limit).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from starlette.concurrency import run_in_threadpool

from app.core.errors import ApiError
from app.decoding import DecodedImage, decode_dicom_dataset, parse_dicom
from app.dicomweb.results import (
    ImageFindings,
    build_secondary_capture,
    build_sr,
    encode,
    source_header,
)
from app.pipeline import ImageWork
from app.state import AppState
from app.study import Models, analyse_study

STUDY_UID_MISMATCH = 0xA900
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700


class Accepted:
    def __init__(self, header: Dataset, image: DecodedImage, decode_ms: float):
        self.header = header
        self.image = image
        self.decode_ms = decode_ms


def read_instance(
    data: bytes, state: AppState, url_study: str | None
) -> Accepted | tuple[str, str, int]:
    """An accepted instance, or (SOP class, SOP instance, failure reason)."""
    t0 = time.perf_counter()
    try:
        ds = parse_dicom(data)  # parsed once: the header for the checks, the pixels to decode
        sop_class = str(ds.SOPClassUID)
        sop_uid = str(ds.SOPInstanceUID)
    except (ApiError, AttributeError):
        return "", "", CANNOT_UNDERSTAND
    if url_study and str(ds.get("StudyInstanceUID", "")) != url_study:
        return sop_class, sop_uid, STUDY_UID_MISMATCH
    try:
        image = decode_dicom_dataset(
            ds, state.settings.max_image_pixels, state.settings.allowed_modalities
        )
    except ApiError as exc:
        reason = {413: OUT_OF_RESOURCES}.get(exc.status, CANNOT_UNDERSTAND)
        if exc.code in ("unsupported_modality", "multi_frame_unsupported", "no_pixel_data"):
            reason = SOP_CLASS_NOT_SUPPORTED
        return sop_class, sop_uid, reason
    state.metrics.stage_duration.labels("decode").observe(time.perf_counter() - t0)
    return Accepted(source_header(ds), image, round(1000 * (time.perf_counter() - t0), 2))


def build_results(
    answer: dict[str, Any],
    accepted: list[Accepted],
    works: list[ImageWork],
    algorithm: tuple[str, str],
) -> list[bytes]:
    findings = [
        ImageFindings(
            source=a.header,
            pixels=w.image.pixels,
            probability=img["fracture_probability"],
            fracture=img["fracture"],
            boxes=np.asarray([d["box"] for d in img["detections"]], dtype=np.float32).reshape(
                -1, 4
            ),
            scores=np.asarray([d["score"] for d in img["detections"]], dtype=np.float32),
        )
        for a, w, img in zip(accepted, works, answer["images"], strict=True)
    ]
    sr = build_sr(findings, answer["operating_point"], algorithm, generate_uid())
    sc_series = generate_uid()
    captures = [build_secondary_capture(f, sc_series, i + 1) for i, f in enumerate(findings)]
    return [encode(sr), *(encode(c) for c in captures)]


async def analyse_instances(
    state: AppState,
    studies: dict[str, list[Accepted]],
    point: Any,
    models: Models,
    request_id: str,
    base_url: str,
) -> list[dict[str, Any]]:
    """Analyse accepted instances, one study per StudyInstanceUID; make, keep and queue the
    SR and secondary captures. Shared by STOW-RS and the DIMSE C-STORE receiver."""
    answers = []
    detector = models[2]
    for study_uid, accepted in studies.items():
        works = [ImageWork(image=a.image, decode_ms=a.decode_ms) for a in accepted]
        answer = await analyse_study(state, works, point, models, request_id)
        answer["study"]["study_instance_uid"] = study_uid
        instances = await run_in_threadpool(
            build_results, answer, accepted, works, (detector.name, detector.version)
        )
        result = state.results.add(study_uid, answer, instances)
        answer["result_id"] = result.result_id
        answer["results_url"] = f"{base_url}/dicomweb/studies/{study_uid}"
        answers.append(answer)
        if state.deliverer is not None:
            state.deliverer.wakeup.set()
    return answers
