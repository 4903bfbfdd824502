"""A DICOM C-STORE receiver (pynetdicom) for modalities and routers that speak DIMSE.

Every instance of an association is checked as it arrives (the C-STORE status says whether it
was accepted, with the same reasons as STOW-RS) and answered success only once it is kept in the
results database's intake, so a crash after the acknowledgement loses nothing: the next start
analyses it (app.pacs.ingest.recover_intake). When the association ends, the accepted instances
are analysed as one study per StudyInstanceUID on the app's event loop (retried when that fails),
and the results are kept and delivered exactly as for STOW-RS. A full intake answers out of
resources (0xA700). C-ECHO is answered.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import OrderedDict
from typing import Any

from app.core.logs import caller
from app.pacs.ingest import OUT_OF_RESOURCES, Accepted, analyse_instances, read_instance
from app.results.store import IntakeJob
from app.service import FractureService

log = logging.getLogger("app.dimse")

# Radiograph storage SOP classes (CR, DX for presentation/processing) and the transfer
# syntaxes the decoder handles.
STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
)
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


class StoreReceiver:
    def __init__(
        self,
        service: FractureService,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        ae_title: str,
        calling_ae_titles: list[str] | None = None,
    ):
        self.service = service
        self.loop = loop
        self.address = (host, port)
        self.ae_title = ae_title
        self.calling_ae_titles = [t.strip() for t in calling_ae_titles or []]
        self.server: Any = None
        self._pending: dict[int, list[Accepted]] = {}
        self._jobs: dict[int, str] = {}  # association -> its intake job
        self._lock = threading.Lock()
        self.retry_delays_s = (2.0, 10.0, 30.0, 60.0)  # analysis failures: retried, then restart

    def start(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True  # associations addressed to another AE title are rejected
        if self.calling_ae_titles:
            ae.require_calling_aet = self.calling_ae_titles
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
        ]
        self.server = ae.start_server(self.address, block=False, evt_handlers=handlers)
        log.info("DICOM C-STORE receiver %s listening on %s:%d", self.ae_title, *self.address)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _on_store(self, event: Any) -> int:
        results = self.service.results
        if results.intake_size() >= self.service.settings.max_intake_instances:
            self.service.metrics.images.labels("rejected").inc()
            log.warning("C-STORE intake full: instance answered out of resources (0xA700)")
            return OUT_OF_RESOURCES
        data = event.encoded_dataset(include_meta=True)
        outcome = read_instance(data, self.service, None)
        if not isinstance(outcome, Accepted):
            self.service.metrics.images.labels("rejected").inc()
            return outcome.reason
        key = id(event.assoc)
        with self._lock:  # one association's instances arrive in order, on its own thread
            job_id = self._jobs.get(key)
            seq = len(self._pending.get(key, []))
        try:
            if job_id is None:
                job_id = uuid.uuid4().hex
                results.open_job(IntakeJob(job_id, [], None, None, ""))
            results.add_instance(job_id, seq, data)  # committed: now it may be acknowledged
        except Exception:
            log.exception("C-STORE instance could not be kept: answered out of resources")
            return OUT_OF_RESOURCES
        with self._lock:
            self._jobs[key] = job_id
            self._pending.setdefault(key, []).append(outcome)
        return 0x0000

    def _on_end(self, event: Any) -> None:
        with self._lock:
            accepted = self._pending.pop(id(event.assoc), [])
            job_id = self._jobs.pop(id(event.assoc), None)
        if not accepted or job_id is None:
            return
        studies: OrderedDict[str, list[Accepted]] = OrderedDict()
        for a in accepted:
            studies.setdefault(a.image.study_instance_uid or "", []).append(a)
        calling = str(event.assoc.requestor.ae_title).strip()
        asyncio.run_coroutine_threadsafe(self._analyse(studies, calling, job_id), self.loop)

    async def _analyse(
        self, studies: dict[str, list[Accepted]], calling_ae: str, job_id: str
    ) -> int:
        """Analyse an association's studies; a failure (models not ready, a database error) is
        retried after each of retry_delays_s, and after the last the instances stay in the
        intake for the next start."""
        caller.set(f"ae:{calling_ae}")  # this task's own context: for the audit lines
        for delay in (*self.retry_delays_s, None):
            request_id = uuid.uuid4().hex
            try:
                plan = self.service.plan()
                await analyse_instances(self.service, studies, plan, request_id, "", job_id)
            except Exception as exc:  # kept in the intake: never only logged and lost
                reason = getattr(exc, "detail", None) or type(exc).__name__
                if delay is None:
                    log.error(
                        "analysis of C-STORE intake job %s failed (%s): kept for the next start",
                        job_id,
                        reason,
                    )
                    return 0
                log.warning(
                    "analysis of C-STORE intake job %s failed (%s): retried in %g s",
                    job_id,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            log.info(
                "request %s: C-STORE association, %d study(ies) analysed", request_id, len(studies)
            )
            return len(studies)
        return 0
