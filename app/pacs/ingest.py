"""DICOM instances in, findings and result objects out: what STOW-RS and C-STORE share.

Failure reasons (DICOM status codes, the same for STOW-RS FailureReason and C-STORE status):
0xA900 study UID mismatch or a missing SOP/study UID, 0x0122 SOP class, modality or body part
(BodyPartExamined outside Settings.allowed_body_parts) not supported, 0xC000 cannot understand (not DICOM, undecodable pixel data), 0xA700 out of resources
(over the pixel limit).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from app.core.errors import ApiError
from app.dicom.results import (
    Algorithms,
    ImageFindings,
    build_secondary_capture,
    build_sr,
    encode,
    new_uid,
    source_header,
)
from app.inference.answers import StoredStudyAnswer, StoredStudyVerdict
from app.inference.decoding import DecodedImage, decode_dicom_dataset, parse_dicom
from app.inference.operating_point import OperatingPoint
from app.inference.pipeline import ImageWork
from app.inference.plan import Plan, Scoring
from app.inference.scope import refuse_out_of_scope
from app.results.store import IntakeJob
from app.service import FractureService

log = logging.getLogger("app.ingest")

STUDY_UID_MISMATCH = 0xA900
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
# Data set does not match the SOP class: SOP class, SOP instance or study UID missing.
MISSING_UID = 0xA900


@dataclass(frozen=True)
class Refused:
    """An instance not taken: its UIDs (empty when unreadable), the DICOM failure reason, and
    the error code and sentence /v1/predict would answer for it."""

    sop_class: str
    sop_uid: str
    reason: int
    error: str = "invalid_dicom"
    detail: str = "not a DICOM instance this service can read"


class Accepted:
    def __init__(self, header: Dataset, image: DecodedImage, decode_ms: float, data: bytes):
        self.header = header
        self.image = image
        self.decode_ms = decode_ms
        self.data = data  # the instance as it arrived: kept in the intake until analysed


def read_instance(
    data: bytes, service: FractureService, url_study: str | None
) -> Accepted | Refused:
    """An accepted instance, or (SOP class, SOP instance, failure reason)."""
    t0 = time.perf_counter()
    try:
        ds = parse_dicom(
            data, service.settings.max_image_pixels
        )  # parsed once: the header for the checks, the pixels to decode
        sop_class = str(ds.SOPClassUID)
        sop_uid = str(ds.SOPInstanceUID)
    except (ApiError, AttributeError):
        return Refused("", "", CANNOT_UNDERSTAND)
    if not sop_class or not sop_uid or not str(ds.get("StudyInstanceUID", "") or ""):
        return Refused(  # refused before any inference
            sop_class, sop_uid, MISSING_UID, "missing_uid", "no SOP or study instance UID"
        )
    if url_study and str(ds.get("StudyInstanceUID", "")) != url_study:
        return Refused(
            sop_class,
            sop_uid,
            STUDY_UID_MISMATCH,
            "study_uid_mismatch",
            "the instance belongs to another study than the URL names",
        )
    try:
        image = decode_dicom_dataset(
            ds, service.settings.max_image_pixels, service.settings.allowed_modalities
        )
        refuse_out_of_scope(image, service.settings.allowed_body_parts)
    except ApiError as exc:
        service.metrics.refused.labels(exc.code).inc()
        reason = {413: OUT_OF_RESOURCES}.get(exc.status, CANNOT_UNDERSTAND)
        out_of_scope = ("unsupported_modality", "out_of_scope")
        if exc.code in (*out_of_scope, "multi_frame_unsupported", "no_pixel_data"):
            reason = SOP_CLASS_NOT_SUPPORTED
        return Refused(sop_class, sop_uid, reason, exc.code, exc.detail)
    service.metrics.stage_duration.labels("decode").observe(time.perf_counter() - t0)
    return Accepted(source_header(ds), image, round(1000 * (time.perf_counter() - t0), 2), data)


def build_results(
    point: OperatingPoint,
    scoring: Scoring,
    accepted: list[Accepted],
    works: list[ImageWork],
    algorithms: Algorithms,
    uid_root: str | None = None,
) -> list[bytes]:
    """The SR and the secondary captures of one study, from the exact values the pipeline
    computed (not the rounded JSON); their UIDs under `uid_root` (Settings.uid_root)."""
    findings = [
        ImageFindings(
            source=a.header,
            pixels=w.image.pixels,
            frame_size=w.image.frame_size,
            probability=w.probability,
            verdict=scoring.level(w.probability),
            ood_score=w.ood_score,
            out_of_distribution=scoring.unfamiliar(w.ood_score),
            operating_point=f"{point.fp_per_image:g} FP/image"
            if point.fp_per_image is not None
            else f"detector score {point.detector_threshold:.3f}",
            boxes=np.asarray(w.boxes, dtype=np.float32).reshape(-1, 4),
            scores=np.asarray(w.scores, dtype=np.float32),
        )
        for a, w in zip(accepted, works, strict=True)
    ]
    exact_point = {
        "detector_threshold": point.detector_threshold,
        "fp_per_image": point.fp_per_image,
        "decision_threshold": scoring.decision_threshold,
        "no_fracture_below": scoring.verdict.no_fracture_below if scoring.verdict else None,
        "fracture_from": scoring.verdict.fracture_from if scoring.verdict else None,
    }
    sr = build_sr(findings, exact_point, algorithms, new_uid(uid_root), uid_root)
    sc_series = new_uid(uid_root)
    captures = [
        build_secondary_capture(f, sc_series, i + 1, uid_root) for i, f in enumerate(findings)
    ]
    return [encode(sr), *(encode(c) for c in captures)]


async def analyse_instances(
    service: FractureService,
    studies: dict[str, list[Accepted]],
    plan: Plan,
    request_id: str,
    base_url: str,
    job_id: str | None = None,
) -> list[StoredStudyAnswer]:
    """Analyse accepted instances, one study per StudyInstanceUID; make, keep and queue the
    SR and secondary captures. Shared by STOW-RS and the DIMSE C-STORE receiver. The instances
    are kept in the intake first and dropped from it once every result is stored (`job_id`: a
    job recovered at start, kept already)."""
    point = plan.point
    if job_id is None and studies:
        job_id = uuid.uuid4().hex
        job = IntakeJob(
            job_id,
            [a.data for accepted in studies.values() for a in accepted],
            point.fp_per_image,
            None if point.fp_per_image is not None else point.detector_threshold,
            base_url,
        )
        await asyncio.to_thread(service.results.accept, job)
    answers = []
    algorithms = Algorithms(
        *((m.name, m.version) for m in (plan.cropper, plan.classifier, plan.detector))
    )
    for study_uid, accepted in studies.items():
        works = [ImageWork(image=a.image, decode_ms=a.decode_ms) for a in accepted]
        delivery = "queued" if service.deliverer is not None else "kept"
        answer = await service.analyse(works, plan, request_id, delivery=delivery)
        instances = await asyncio.to_thread(
            build_results,
            point,
            plan.scoring,
            accepted,
            works,
            algorithms,
            service.settings.uid_root,
        )
        result_id = uuid.uuid4().hex[:12]
        stored = StoredStudyAnswer(
            **answer.model_dump(exclude={"study"}),
            study=StoredStudyVerdict(**answer.study.model_dump(), study_instance_uid=study_uid),
            result_id=result_id,
            results_url=f"{base_url}/dicomweb/studies/{study_uid}",
        )
        await asyncio.to_thread(service.results.add, study_uid, stored, instances, result_id)
        answers.append(stored)
        if service.deliverer is not None:
            service.deliverer.wakeup.set()
    if job_id is not None:
        await asyncio.to_thread(service.results.finish, job_id)
    return answers


async def recover_intake(service: FractureService, jobs: list[IntakeJob]) -> int:
    """Analyse what a previous process accepted and did not finish (killed mid-analysis or while
    a C-STORE association was still sending): `jobs`, read at start before any door opens; the
    number of jobs recovered. With replicas sharing PostgreSQL, a job still running in another
    live replica would be analysed twice: two results, both delivered, neither replacing."""
    for job in jobs:
        plan = service.plan(fp_per_image=job.fp_per_image, score_threshold=job.score_threshold)
        studies: OrderedDict[str, list[Accepted]] = OrderedDict()
        for data in job.instances:
            outcome = await asyncio.to_thread(read_instance, data, service, None)
            if isinstance(outcome, Accepted):
                studies.setdefault(outcome.image.study_instance_uid or "", []).append(outcome)
        log.warning(
            "intake job %s: %d instance(s) accepted before a restart, analysed now",
            job.job_id,
            len(job.instances),
        )
        # finishes the job too, also when none of its instances reads any more
        await analyse_instances(service, studies, plan, uuid.uuid4().hex, job.base_url, job.job_id)
    return len(jobs)
