"""API-key authentication (FRACTURE_API_KEYS): `Authorization: Bearer <key>` on every endpoint
but the probes (and /metrics when FRACTURE_METRICS_PUBLIC). Pure ASGI, so a refused request's
body is never read. Keys are compared in constant time and never logged; a key is known in logs
and the audit trail by its id, the first 12 hex digits of its sha256."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from app.api.errors import error_response
from app.core.logs import caller

PROBE_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
# Probes, and the viewer's static page (it holds no data; its calls to the API carry the key).
OPEN_PATHS = (
    *PROBE_PATHS,
    "/viewer",
    "/viewer/viewer.js",
    "/viewer/viewer.css",
)


def open_paths(metrics_public: bool) -> tuple[str, ...]:
    """The paths served without a key."""
    return OPEN_PATHS + (("/metrics",) if metrics_public else ())


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class ApiKeyMiddleware:
    def __init__(self, app: Any, keys: list[str], metrics_public: bool):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = open_paths(metrics_public)

    def match(self, presented: bytes) -> str | None:
        """The id of the key presented, checking every key in constant time."""
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key):
                found = key.decode()
        return key_id(found) if found is not None else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        identity = self.match(token.strip()) if scheme.lower() == b"bearer" else None
        if identity is None:
            detail = "missing API key" if not header else "the API key is not valid"
            response = error_response(
                401, "unauthorized", detail, {"WWW-Authenticate": 'Bearer realm="fracture"'}
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["key_id"] = identity
        token = caller.set(f"key:{identity}")
        try:
            await self.app(scope, receive, send)
        finally:
            caller.reset(token)
