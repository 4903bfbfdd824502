"""A DICOM C-STORE receiver (pynetdicom) for modalities and routers that speak DIMSE.

Every instance of an association is checked as it arrives (the C-STORE status says whether it
was accepted, with the same reasons as STOW-RS); when the association is released, the accepted
instances are analysed as one study per StudyInstanceUID on the app's event loop, and the results
are kept and delivered exactly as for STOW-RS. C-ECHO is answered.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import OrderedDict
from typing import Any

from app.core.logs import caller
from app.pacs.ingest import Accepted, analyse_instances, read_instance
from app.state import AppState
from app.study import resolve_models

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
        state: AppState,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        ae_title: str,
        calling_ae_titles: list[str] | None = None,
    ):
        self.state = state
        self.loop = loop
        self.address = (host, port)
        self.ae_title = ae_title
        self.calling_ae_titles = [t.strip() for t in calling_ae_titles or []]
        self.server: Any = None
        self._pending: dict[int, list[Accepted]] = {}
        self._lock = threading.Lock()

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
        outcome = read_instance(event.encoded_dataset(include_meta=True), self.state, None)
        if not isinstance(outcome, Accepted):
            self.state.metrics.images.labels("rejected").inc()
            return outcome.reason
        with self._lock:
            self._pending.setdefault(id(event.assoc), []).append(outcome)
        return 0x0000

    def _on_end(self, event: Any) -> None:
        with self._lock:
            accepted = self._pending.pop(id(event.assoc), [])
        if not accepted:
            return
        studies: OrderedDict[str, list[Accepted]] = OrderedDict()
        for a in accepted:
            studies.setdefault(a.image.study_instance_uid or "", []).append(a)
        calling = str(event.assoc.requestor.ae_title).strip()
        future = asyncio.run_coroutine_threadsafe(self._analyse(studies, calling), self.loop)
        future.add_done_callback(self._report)

    async def _analyse(self, studies: dict[str, list[Accepted]], calling_ae: str) -> int:
        caller.set(f"ae:{calling_ae}")  # this task's own context: for the audit lines
        crp, clf, det, point = resolve_models(self.state, None, None, None, None)
        request_id = uuid.uuid4().hex
        await analyse_instances(self.state, studies, point, (crp, clf, det), request_id, "")
        log.info(
            "request %s: C-STORE association, %d study(ies) analysed", request_id, len(studies)
        )
        return len(studies)

    @staticmethod
    def _report(future: Any) -> None:
        if future.exception() is not None:
            log.error(
                "analysis of a C-STORE association failed: %s", type(future.exception()).__name__
            )
