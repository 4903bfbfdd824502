"""Results of analysed studies, kept until the PACS has them (bounded by a retention time),
and the background delivery to a DICOMweb destination (STOW-RS client) with retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field

import httpx

from app.core.metrics import Metrics
from app.dicom.multipart import build_related
from app.inference.answers import StoredStudyAnswer

log = logging.getLogger("app.dicomweb.delivery")


@dataclass
class StudyResult:
    result_id: str
    study_uid: str
    findings: StoredStudyAnswer
    instances: list[bytes]  # the SR and the secondary captures, Part 10 encoded
    created: float = field(default_factory=time.monotonic)
    delivered: bool = False
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    given_up: bool = False  # the destination refused it for good (a 4xx other than 408/429)


class ResultStore:
    """Thread-safe map of study UID -> latest results, with retention."""

    def __init__(self, retention_s: float):
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._by_study: dict[str, StudyResult] = {}

    def add(
        self, study_uid: str, findings: StoredStudyAnswer, instances: list[bytes], result_id: str
    ) -> StudyResult:
        result = StudyResult(result_id, study_uid, findings, instances)
        with self._lock:
            self._by_study[study_uid] = result
        return result

    def get(self, study_uid: str) -> StudyResult | None:
        with self._lock:
            return self._by_study.get(study_uid)

    def pending(self, now: float) -> list[StudyResult]:
        with self._lock:
            return [
                r
                for r in self._by_study.values()
                if not r.delivered and not r.given_up and r.next_attempt <= now
            ]

    def backlog(self) -> int:
        """Results still to deliver (not delivered, not given up)."""
        with self._lock:
            return sum(not r.delivered and not r.given_up for r in self._by_study.values())

    def expire(self, now: float) -> int:
        """Forget results past retention; the number dropped undelivered (each logged)."""
        dropped = 0
        with self._lock:
            old = [k for k, r in self._by_study.items() if now - r.created > self.retention_s]
            for key in old:
                result = self._by_study.pop(key)
                if not result.delivered and not result.given_up:
                    dropped += 1
                    log.error(
                        "result %s dropped undelivered after %d attempts (retention %.0f s): %s",
                        result.result_id,
                        result.attempts,
                        self.retention_s,
                        result.last_error,
                    )
        return dropped


class Deliverer:
    """Stores every pending result at the destination's STOW-RS endpoint, retrying with backoff."""

    def __init__(
        self,
        store: ResultStore,
        destination: str,
        retry_s: float,
        max_backoff_s: float,
        timeout_s: float,
        auth: httpx.Auth | None = None,
        headers: dict[str, str] | None = None,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.metrics = metrics
        self.auth = auth
        self.headers = headers or {}
        self.url = destination.rstrip("/") + "/studies"
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.wakeup = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(
            timeout=self.timeout_s, auth=self.auth, headers=self.headers
        ) as client:
            while True:
                now = time.monotonic()
                dropped = self.store.expire(now)
                if dropped and self.metrics is not None:
                    self.metrics.delivery_dropped.labels("retention").inc(dropped)
                for result in self.store.pending(now):
                    await self._deliver(client, result)
                if self.metrics is not None:
                    self.metrics.delivery_backlog.set(self.store.backlog())
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), timeout=self.retry_s)

    async def _deliver(self, client: httpx.AsyncClient, result: StudyResult) -> None:
        body, ctype = build_related(result.instances)
        result.attempts += 1
        try:
            response = await client.post(
                self.url,
                content=body,
                headers={"content-type": ctype, "accept": "application/dicom+json"},
            )
            ok, error = _stored(response)
        except httpx.HTTPError as exc:
            ok, error = False, type(exc).__name__
            response = None
        status = response.status_code if response is not None else 0
        if self.metrics is not None:
            self.metrics.delivery_attempts.labels("delivered" if ok else "failed").inc()
        if not ok and 400 <= status < 500 and status not in (408, 429):
            # The destination will refuse this again: stop, say so once, keep it retrievable.
            result.given_up, result.last_error = True, error
            if self.metrics is not None:
                self.metrics.delivery_dropped.labels("refused").inc()
            log.error(
                "result %s refused by the PACS (%s): not retried; still retrievable here",
                result.result_id,
                error,
            )
            return
        if ok:
            result.delivered = True
            result.last_error = None
            log.info(
                "result %s delivered to the PACS (%d objects, attempt %d)",
                result.result_id,
                len(result.instances),
                result.attempts,
            )
            return
        # Exponential backoff with jitter, so many failed results do not retry in lockstep.
        backoff = min(self.max_backoff_s, self.retry_s * 2 ** (result.attempts - 1))
        backoff *= random.uniform(0.8, 1.2)
        result.next_attempt = time.monotonic() + backoff
        result.last_error = error
        log.warning(
            "delivery of result %s to the PACS failed (attempt %d, %s); retrying in %.0f s",
            result.result_id,
            result.attempts,
            error,
            backoff,
        )


def _stored(response: httpx.Response) -> tuple[bool, str | None]:
    """Whether a STOW-RS answer means every object was stored: a 202 listing failed SOP
    instances is a partial failure, not a success."""
    if response.status_code == 200:
        return True, None
    if response.status_code == 202:
        try:
            failed = response.json().get("00081198", {}).get("Value", [])
        except ValueError:
            failed = []
        if failed:
            return False, f"HTTP 202 with {len(failed)} failed object(s)"
        return True, None
    return False, f"HTTP {response.status_code}"
