"""The one domain error every layer raises for what a client caused; app/api/errors.py turns it
into HTTP, app/pacs/ingest.py into DICOM statuses. No web framework here."""

from __future__ import annotations


class ApiError(Exception):
    """An answer the client caused: status, a stable machine code, one human sentence."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
