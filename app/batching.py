"""Dynamic batching across requests (Triton's idea, greedy): `workers` tasks each take the studies
waiting for the same plan (models, operating point, options), up to `max_images` images, and run the
pipeline once over all of them; a study that arrives while a batch computes joins the next one.
Nothing waits for a batch to fill unless `max_delay_s` says so, so one client alone sees no
added latency, and with many clients each model call carries several images.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from app.inference.pipeline import ImageWork, StageTimer, run_study
from app.inference.plan import Plan

# Runs when a study's batch forms, before any model: raises to drop the study (e.g. 499 when its
# client has left); the exception is what the study's caller gets.
Check = Callable[[], Awaitable[None]]


@dataclass
class _Study:
    key: Hashable
    works: list[ImageWork]
    plan: Plan
    before_compute: Check | None
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class StudyBatcher:
    def __init__(
        self,
        workers: int,
        max_images: int,
        max_delay_s: float = 0.0,
        on_stage: StageTimer | None = None,
        on_batch: Callable[[float, int], None] | None = None,
    ):
        self.workers = workers
        self.max_images = max_images
        self.max_delay_s = max_delay_s
        self.on_stage = on_stage
        self.on_batch = on_batch  # (seconds, studies) of each batch computed
        self.pending: list[_Study] = []
        self.arrived = asyncio.Condition()
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def analyse(
        self,
        works: list[ImageWork],
        plan: Plan,
        before_compute: Check | None = None,
    ) -> None:
        """Fill `works` in place as `plan` says; what `before_compute` raised when it dropped
        the study."""
        study = _Study(plan.batch_key, works, plan, before_compute)
        async with self.arrived:
            self.pending.append(study)
            self.arrived.notify()
        await study.done

    async def _take(self) -> list[_Study]:
        """The oldest waiting study and those that can share its batch."""
        async with self.arrived:
            await self.arrived.wait_for(lambda: bool(self.pending))
            if self.max_delay_s > 0:
                deadline = time.monotonic() + self.max_delay_s
                while self._images_like(self.pending[0]) < self.max_images:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        await asyncio.wait_for(self.arrived.wait(), left)
                    except TimeoutError:
                        break
            first = self.pending[0]
            batch, images = [], 0
            for study in list(self.pending):
                if study.key != first.key:
                    continue
                if batch and images + len(study.works) > self.max_images:
                    break
                batch.append(study)
                images += len(study.works)
                self.pending.remove(study)
            return batch

    def _images_like(self, first: _Study) -> int:
        return sum(len(s.works) for s in self.pending if s.key == first.key)

    async def _work(self) -> None:
        while True:
            batch = await self._take()
            live = []
            for study in batch:
                if study.done.done():  # its request was cancelled meanwhile
                    continue
                if study.before_compute is not None:
                    try:
                        await study.before_compute()
                    except Exception as exc:
                        study.done.set_exception(exc)
                        continue
                live.append(study)
            if not live:
                continue
            works = [w for s in live for w in s.works]
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(run_study, works, live[0].plan, self.on_stage)
            except Exception as exc:  # every study of the batch gets the failure
                for s in live:
                    if not s.done.done():
                        s.done.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(time.perf_counter() - t0, len(live))
            for s in live:
                if not s.done.done():
                    s.done.set_result(None)
