"""The service object, built once at start: settings, the model registry, the model workers
(batcher), metrics, admission, results and their delivery. Every door (/v1/predict, STOW-RS,
C-STORE) asks it for a plan, then for the analysis of a study under that plan; neither takes a
web request or knows which door the study came through."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from app.admission import Admission
from app.batching import StudyBatcher
from app.core.config import Settings
from app.core.errors import ApiError
from app.core.logs import caller
from app.core.metrics import Metrics
from app.inference.answers import NotAnalysed, StudyAnswer
from app.inference.pipeline import ImageWork
from app.inference.plan import Plan, resolve_plan
from app.inference.runtime import ModelLoadError, ModelRegistry
from app.results.delivery import Deliverer
from app.results.feedback import FeedbackStore
from app.results.store import ResultStore
from app.study import refuse_unreadable, study_answer

log = logging.getLogger("app")
audit = logging.getLogger("app.audit")

# Whether the client has left (a web request's is_disconnected); None where nobody waits.
Gone = Callable[[], Awaitable[bool]]


@dataclass
class FractureService:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None
    ready: bool = False
    not_ready_reason: str = "models are loading"
    admission: Admission = field(default_factory=lambda: Admission(2, 8))
    results: ResultStore | None = None
    feedback: FeedbackStore | None = None
    deliverer: Deliverer | None = None
    batcher: StudyBatcher | None = None

    @property
    def inference_slots(self) -> asyncio.Semaphore:
        """The model slots (`inference_workers` of them) that admitted requests wait for."""
        return self.admission.slots

    def load_models(self) -> None:
        """Load every card's model, check sha256, warm up, resolve the default plan once (so a
        folder the defaults cannot be served from is not ready); readiness follows."""
        s = self.settings
        t0 = time.perf_counter()
        try:
            registry = ModelRegistry(s.models_dir, s.site_calibration)
            self.registry = registry
            registry.load_all(s.execution_provider, s.intra_op_threads, s.intra_op_spinning)
            resolve_plan(registry, s)
        except (ModelLoadError, OSError, ValueError, KeyError, ApiError) as exc:
            self.ready = False
            self.not_ready_reason = f"models failed to load: {getattr(exc, 'detail', exc)}"
            log.error(self.not_ready_reason)
            return
        for mdl in registry.models.values():
            self.metrics.model_info.labels(
                mdl.role, mdl.name, mdl.version, mdl.card.sha256[:12], mdl.provider
            ).set(1)
        self.ready = True
        log.info("ready in %.2f s with %d models", time.perf_counter() - t0, len(registry.models))

    def start_batcher(self) -> StudyBatcher:
        """The model workers: batches of studies across requests, timed into the metrics."""
        s, m = self.settings, self.metrics

        def on_stage(stage: str, seconds: float, n: int) -> None:
            m.stage_duration.labels(stage).observe(seconds)
            m.batch_size.labels(stage).observe(n)

        def on_batch(seconds: float, studies: int) -> None:
            self.admission.observe(seconds / studies)  # Retry-After estimates per request

        on_gpu = self.registry is not None and any(
            model.provider != "CPUExecutionProvider" for model in self.registry.models.values()
        )
        max_images = s.batch_max_images or (8 if on_gpu else 1)
        self.batcher = StudyBatcher(
            s.inference_workers,
            max_images,
            s.batch_max_delay_ms / 1000,
            on_stage=on_stage,
            on_batch=on_batch,
        )
        self.batcher.start()
        return self.batcher

    def plan(
        self,
        classifier: str | None = None,
        detector: str | None = None,
        fp_per_image: float | None = None,
        score_threshold: float | None = None,
    ) -> Plan:
        """The plan of one request (the defaults for what it does not name); 503 before the
        models are ready, 422 for an unknown model or an operating point out of range."""
        if not self.ready or self.registry is None:
            raise ApiError(503, "not_ready", self.not_ready_reason)
        return resolve_plan(
            self.registry, self.settings, classifier, detector, fp_per_image, score_threshold
        )

    async def abandon_if_gone(self, gone: Gone | None, request_id: str) -> None:
        """Stop before spending model time on a client that has disconnected (it waited in the
        queue and gave up): counted, logged, answered with a 499 nobody reads."""
        if gone is not None and await gone():
            self.metrics.abandoned.inc()
            log.info("request %s: client gone before inference; not computed", request_id)
            raise ApiError(499, "client_closed_request", "the client disconnected")

    async def analyse(
        self,
        works: list[ImageWork],
        plan: Plan,
        request_id: str,
        gone: Gone | None = None,
        delivery: str = "answered",
        not_analysed: list[NotAnalysed] | None = None,
        refuse_unreadable_images: bool = False,
    ) -> StudyAnswer:
        """Run the plan on the decoded images of one study; the answer of /v1/predict. `gone`
        says whether the client has left: checked once a model slot is free. `delivery` (for the
        audit line): "answered" to the caller, "queued" for the PACS, or "kept" here.
        `not_analysed`: files of the request refused already; with `refuse_unreadable_images`,
        images that are no radiograph the models can read join them (422 when none is left)."""
        if self.batcher is None:
            raise ApiError(503, "not_ready", "the service is starting or stopping")
        # the batcher checks `gone` once the study's batch forms, before any model runs
        await self.batcher.analyse(works, plan, lambda: self.abandon_if_gone(gone, request_id))
        refused = list(not_analysed or [])
        if refuse_unreadable_images:
            try:
                works, unreadable = refuse_unreadable(works, plan)
            except ApiError as exc:
                self.metrics.refused.labels(exc.code).inc(len(works))
                raise
            refused += unreadable
            for item in unreadable:
                self.metrics.refused.labels(item.error).inc()
        answer = study_answer(works, plan, request_id, sorted(refused, key=lambda r: r.index))
        m, name = self.metrics, plan.classifier.name
        for img in answer.images:
            m.images.labels("fracture" if img.fracture else "no_fracture").inc()
            m.probability.labels(name).observe(img.fracture_probability)
            if img.ood_score is not None:
                m.ood_score.labels(name).observe(img.ood_score)
            if img.out_of_distribution:
                m.flagged.labels(name, "out_of_distribution").inc()
        study = answer.study
        log.info(
            "request %s: %d image(s), study probability %.3f",
            request_id,
            study.images,
            study.fracture_probability,
        )
        study_uid = next(
            (w.image.study_instance_uid for w in works if w.image.study_instance_uid), None
        )
        audit.info(
            "study analysed",
            extra={
                "audit": {
                    "caller": caller.get(),
                    # a hash, not the UID: the audit trail links studies without identifying them
                    "study": hashlib.sha256(study_uid.encode()).hexdigest()[:16]
                    if study_uid
                    else None,
                    "models": {m.role: f"{m.name} {m.version}" for m in plan.models},
                    "fp_per_image": plan.point.fp_per_image,
                    "detector_threshold": round(plan.point.detector_threshold, 6),
                    "images": study.images,
                    "probability": round(study.fracture_probability, 4),
                    "fracture": study.fracture,
                    "delivery": delivery,
                }
            },
        )
        return answer
