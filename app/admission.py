"""Admission control in front of the models: at most `workers` requests compute at once and at
most `max_queue` more wait for a slot; past that a request is refused at once (503 with
Retry-After) instead of joining a queue whose clients have long given up."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from app.core.errors import ApiError


class Admission:
    def __init__(
        self,
        workers: int,
        max_queue: int,
        on_reject: Callable[[], None] | None = None,
        seconds_per_request: float = 0.5,
    ):
        self.slots = asyncio.Semaphore(workers)
        self.on_reject = on_reject
        self.workers = workers
        self.capacity = workers + max_queue
        self.admitted = 0
        # a running estimate of how long one request holds the models, for Retry-After
        self.seconds_per_request = seconds_per_request

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.admitted / self.workers * self.seconds_per_request))

    def observe(self, seconds: float) -> None:
        self.seconds_per_request = 0.9 * self.seconds_per_request + 0.1 * seconds

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a place among the admitted requests (running or queued), or raise 503."""
        if self.admitted >= self.capacity:
            if self.on_reject is not None:
                self.on_reject()
            raise ApiError(
                503,
                "overloaded",
                f"{self.admitted} requests are already running or queued; retry later",
                headers={"Retry-After": str(self.retry_after_s())},
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1
