"""What the app holds between requests: settings, models, metrics, readiness."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from app.admission import Admission
from app.core.config import Settings
from app.core.metrics import Metrics
from app.dicomweb.store import Deliverer, ResultStore
from app.runtime import ModelRegistry


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None
    ready: bool = False
    not_ready_reason: str = "models are loading"
    admission: Admission = field(default_factory=lambda: Admission(2, 8))

    @property
    def inference_slots(self) -> asyncio.Semaphore:
        """The model slots (`inference_workers` of them) that admitted requests wait for."""
        return self.admission.slots

    results: ResultStore | None = None
    deliverer: Deliverer | None = None
