"""The outermost ASGI layer: body limits (413 before or while reading), request ids (echoed as
X-Request-ID, on every log line), the access log, and request metrics by route template."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from app.api.auth import PROBE_PATHS
from app.api.errors import error_response
from app.core.logs import new_request_id, request_id
from app.service import FractureService

access = logging.getLogger("app.access")
# Probes and scrapes are not work: left out of the access log and the in-flight gauge.
UNCOUNTED_PATHS = (*PROBE_PATHS, "/metrics")


class BodyTooLargeError(Exception):
    pass


class BodyTimeoutError(Exception):
    """The client stopped sending its body (e.g. shorter than its Content-Length)."""


class LimitsAndMetricsMiddleware:
    """Pure ASGI: refuses bodies over the limit (413, before or while reading) and records
    request counts, durations and in-flight requests by route template (never by request)."""

    def __init__(self, app: Any, service: FractureService):
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.service.settings.max_body_bytes
        m = self.service.metrics
        started = time.perf_counter()
        status = {"code": 500}
        # Probes and scrapes are not work: they stay out of the gauge the autoscaler reads.
        counted = scope["path"] not in UNCOUNTED_PATHS
        if counted:
            m.in_flight.inc()
        headers = dict(scope.get("headers") or [])
        rid = new_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        token = request_id.set(rid)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await _send_error(
                    send_wrapper,
                    413,
                    "body_too_large",
                    f"the body is over the limit of {limit} bytes",
                )
                return
            received, body_done = 0, False
            read_timeout = self.service.settings.body_read_timeout_s

            async def receive_limited() -> dict:
                nonlocal received, body_done
                if body_done:  # later receives wait for a disconnect: no deadline
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), timeout=read_timeout)
                except TimeoutError:
                    raise BodyTimeoutError() from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLargeError()
                    body_done = not message.get("more_body", False)
                return message

            try:
                await self.app(scope, receive_limited, send_wrapper)
            except BodyTooLargeError:
                await _send_error(
                    send_wrapper,
                    413,
                    "body_too_large",
                    f"the body is over the limit of {limit} bytes",
                )
            except BodyTimeoutError:
                await _send_error(
                    send_wrapper,
                    408,
                    "request_timeout",
                    f"no body data for {read_timeout:g} s: the body is shorter than announced "
                    "or the client stalled",
                )
        finally:
            if counted:
                m.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            seconds = time.perf_counter() - started
            m.requests.labels(endpoint, str(status["code"])).inc()
            m.request_duration.labels(endpoint).observe(seconds)
            if counted:
                access.info(
                    "%s %s %d",
                    scope.get("method"),
                    endpoint,
                    status["code"],
                    extra={
                        "method": scope.get("method"),
                        "path": endpoint,
                        "status": status["code"],
                        "duration_ms": round(1000 * seconds, 1),
                        **(
                            {"key_id": scope["state"]["key_id"]}
                            if "key_id" in scope["state"]
                            else {}
                        ),
                    },
                )
            request_id.reset(token)


async def _send_error(send: Any, status: int, code: str, detail: str) -> None:
    response = error_response(status, code, detail)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
