"""Delivery of results to the PACS, retried with backoff until acknowledged: STOW-RS to a
DICOMweb destination, or C-STORE (pynetdicom SCU) for a PACS without DICOMweb.

A refusal that will not change (an HTTP 4xx other than 408/429; an association rejected for
good; a C-STORE failure status for the objects themselves) stops the retries: the result stays
retrievable here, marked given up, counted and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import random
import time
from dataclasses import dataclass
from typing import Protocol

import httpx

from app.core.metrics import Metrics
from app.dicom.multipart import build_related
from app.results.store import ResultStore, StudyResult

log = logging.getLogger("app.dicomweb.delivery")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    permanent: bool = False  # a failure that retrying will not mend
    error: str | None = None


class Sender(Protocol):
    async def __aenter__(self) -> Sender: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def send(self, instances: list[bytes]) -> Outcome: ...


class StowSender:
    """STOW-RS to `<destination>/studies`."""

    def __init__(
        self,
        destination: str,
        timeout_s: float,
        auth: httpx.Auth | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.url = destination.rstrip("/") + "/studies"
        self.client = httpx.AsyncClient(timeout=timeout_s, auth=auth, headers=headers or {})

    async def __aenter__(self) -> StowSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def send(self, instances: list[bytes]) -> Outcome:
        body, ctype = build_related(instances)
        try:
            response = await self.client.post(
                self.url,
                content=body,
                headers={"content-type": ctype, "accept": "application/dicom+json"},
            )
        except httpx.HTTPError as exc:
            return Outcome(False, False, type(exc).__name__)
        ok, error = _stored(response)
        status = response.status_code
        return Outcome(ok, not ok and 400 <= status < 500 and status not in (408, 429), error)


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


def parse_dimse_destination(text: str) -> tuple[str, str, int]:
    """'AET@host:port' -> (AE title, host, port); ValueError when malformed."""
    ae_title, sep, address = text.partition("@")
    host, _, port = address.rpartition(":")
    if not sep or not ae_title or len(ae_title) > 16 or not host or not port.isdigit():
        raise ValueError(f"a DIMSE destination is AET@host:port, not {text!r}")
    return ae_title, host, int(port)


class CStoreSender:
    """C-STORE of each object over one association per result (pynetdicom, in a thread)."""

    def __init__(self, destination: str, calling_ae: str, timeout_s: float):
        self.called_ae, self.host, self.port = parse_dimse_destination(destination)
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s

    async def __aenter__(self) -> CStoreSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, instances: list[bytes]) -> Outcome:
        return await asyncio.to_thread(self._send, instances)

    def _send(self, instances: list[bytes]) -> Outcome:
        import pydicom
        from pynetdicom import AE

        datasets = [pydicom.dcmread(io.BytesIO(data)) for data in instances]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            # A-ASSOCIATE-RJ "rejected permanent" (e.g. our AE title unknown there) will not mend
            primitive = getattr(assoc.acceptor, "primitive", None)
            permanent = assoc.is_rejected and getattr(primitive, "result", None) == 0x01
            reason = "association rejected" if assoc.is_rejected else "no association"
            return Outcome(False, permanent, f"C-STORE {reason}")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code is None:
                    return Outcome(False, False, "C-STORE without a response")
                # success 0x0000 and warnings 0xB000/0xB006/0xB007: the object is stored
                if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                    # refused for the object itself (0xA7xx resources may clear up: retried)
                    return Outcome(False, (code >> 8) != 0xA7, f"C-STORE status 0x{code:04X}")
            return Outcome(True)
        finally:
            assoc.release()


class Deliverer:
    """Sends every pending result to the destination, retrying with backoff."""

    def __init__(
        self,
        store: ResultStore,
        sender: Sender,
        retry_s: float,
        max_backoff_s: float,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.sender = sender
        self.metrics = metrics
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        self.wakeup = asyncio.Event()

    async def run(self) -> None:
        async with self.sender:
            while True:
                now = time.time()
                dropped = await asyncio.to_thread(self.store.expire, now)
                if dropped and self.metrics is not None:
                    self.metrics.delivery_dropped.labels("retention").inc(dropped)
                for result in await asyncio.to_thread(self.store.pending, now):
                    await self._deliver(result)
                    await asyncio.to_thread(self.store.record_attempt, result)
                if self.metrics is not None:
                    self.metrics.delivery_backlog.set(await asyncio.to_thread(self.store.backlog))
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), timeout=self.retry_s)

    async def _deliver(self, result: StudyResult) -> None:
        result.attempts += 1
        outcome = await self.sender.send(result.instances)
        ok, error = outcome.ok, outcome.error
        if self.metrics is not None:
            self.metrics.delivery_attempts.labels("delivered" if ok else "failed").inc()
        if not ok and outcome.permanent:
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
        result.next_attempt = time.time() + backoff
        result.last_error = error
        log.warning(
            "delivery of result %s to the PACS failed (attempt %d, %s); retrying in %.0f s",
            result.result_id,
            result.attempts,
            error,
            backoff,
        )
