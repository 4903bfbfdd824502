"""The service object: what the app holds between requests (settings, the model registry,
metrics, admission, results and their delivery) and how models are loaded at start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from app.admission import Admission
from app.batching import StudyBatcher
from app.core.config import Settings
from app.core.metrics import Metrics
from app.inference.runtime import ModelLoadError, ModelRegistry, OnnxModel
from app.results.delivery import Deliverer
from app.results.store import ResultStore

log = logging.getLogger("app")


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None
    orienter: OnnxModel | None = None  # the registry's, run on every study (FRACTURE_ORIENT)
    ready: bool = False
    not_ready_reason: str = "models are loading"
    admission: Admission = field(default_factory=lambda: Admission(2, 8))
    results: ResultStore | None = None
    deliverer: Deliverer | None = None
    batcher: StudyBatcher | None = None

    @property
    def inference_slots(self) -> asyncio.Semaphore:
        """The model slots (`inference_workers` of them) that admitted requests wait for."""
        return self.admission.slots


def start_batcher(state: AppState) -> StudyBatcher:
    """The model workers: batches of studies across requests, timed into the metrics."""
    s, m = state.settings, state.metrics

    def on_stage(stage: str, seconds: float, n: int) -> None:
        m.stage_duration.labels(stage).observe(seconds)
        m.batch_size.labels(stage).observe(n)

    def on_batch(seconds: float, studies: int) -> None:
        state.admission.observe(seconds / studies)  # Retry-After estimates per request

    on_gpu = state.registry is not None and any(
        model.provider != "CPUExecutionProvider" for model in state.registry.models.values()
    )
    max_images = s.batch_max_images or (8 if on_gpu else 1)
    state.batcher = StudyBatcher(
        s.inference_workers,
        max_images,
        s.batch_max_delay_ms / 1000,
        on_stage=on_stage,
        on_batch=on_batch,
        orienter=state.orienter,
        **s.pipeline_stages(),
    )
    state.batcher.start()
    return state.batcher


def load_models(state: AppState) -> None:
    """Load every card's model, check sha256, warm up; readiness follows the outcome."""
    s = state.settings
    t0 = time.perf_counter()
    try:
        registry = ModelRegistry(s.models_dir, s.site_calibration)
        state.registry = registry
        registry.load_all(s.execution_provider, s.intra_op_threads, s.intra_op_spinning)
        for role in ("classifier", "detector"):
            registry.get(role, None, getattr(s, f"default_{role}"))
        state.orienter = registry.orienter(s.orient)
    except (ModelLoadError, OSError, ValueError, KeyError) as exc:
        state.ready = False
        state.not_ready_reason = f"models failed to load: {exc}"
        log.error(state.not_ready_reason)
        return
    for mdl in registry.models.values():
        state.metrics.model_info.labels(
            mdl.role, mdl.name, mdl.version, mdl.card.sha256[:12], mdl.provider
        ).set(1)
    state.ready = True
    log.info("ready in %.2f s with %d models", time.perf_counter() - t0, len(registry.models))
