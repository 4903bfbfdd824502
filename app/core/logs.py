"""JSON logs: one line per event, the request id on every line logged while serving a request.

The id comes from the caller's X-Request-ID when it is a plain token (else a new one), is echoed
in the response's X-Request-ID, and lives in a context variable so code below the web layer logs
it without being handed the request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Who sent the work being served: "key:<key id>" (API keys on), "ae:<calling AE title>" (DIMSE),
# or "anonymous"; read by the audit line of each study.
caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="anonymous")


def new_request_id(given: str | None) -> str:
    """The caller's id when it is a plain token of at most 64 characters, else a fresh one."""
    given = (given or "")[:64]
    return given if given and given.replace("-", "").isalnum() else uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            line["request_id"] = rid
        for key in ("method", "path", "status", "duration_ms", "key_id", "audit"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__  # the type only: messages can leak
        return json.dumps(line)


def configure(level: str, json_lines: bool = True) -> None:
    """Root logging for the service; uvicorn's own access log is replaced by ours."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's loggers come with plain-text handlers of their own: through the root instead, so
    # start-up, shutdown and server errors are JSON lines like every other
    for name in ("uvicorn", "uvicorn.error"):
        server = logging.getLogger(name)
        server.handlers.clear()
        server.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
