"""Authentication: `Authorization: Bearer <key>` with a static API key (FRACTURE_API_KEYS), or a
JWT from the hospital's identity provider (FRACTURE_OIDC_ISSUER, app/api/identity.py), on every
endpoint but the probes and the viewer page (and /metrics when FRACTURE_METRICS_PUBLIC). Pure ASGI, so a refused request's
body is never read. Keys are compared in constant time and never logged; a key is known in logs
and the audit trail by its id, the first 12 hex digits of its sha256."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from app.api.errors import error_response
from app.api.identity import InvalidTokenError, JwtVerifier
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
    """Static API keys, and with an identity provider configured its bearer JWTs too."""

    def __init__(
        self, app: Any, keys: list[str], metrics_public: bool, verifier: JwtVerifier | None = None
    ):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = open_paths(metrics_public)
        self.verifier = verifier

    def match(self, presented: bytes) -> str | None:
        """The id of the key presented, checking every key in constant time."""
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key):
                found = key.decode()
        return key_id(found) if found is not None else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        protected = bool(self.keys) or self.verifier is not None
        if scope["type"] != "http" or not protected or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        bearer = token.strip() if scheme.lower() == b"bearer" else b""
        identity, who = self.match(bearer) if bearer else None, ""
        detail = "missing API key or token" if not header else "the API key is not valid"
        if identity is not None:
            who = f"key:{identity}"
        elif bearer.count(b".") == 2 and self.verifier is not None:
            try:
                claims = await self.verifier.verify(bearer.decode("ascii", "replace"))
                who = f"sub:{claims['sub']}"
            except InvalidTokenError as exc:
                detail = str(exc)
        if not who:
            response = error_response(
                401,
                "unauthorized",
                detail,
                {"WWW-Authenticate": 'Bearer realm="fracture", error="invalid_token"'},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["key_id"] = who.split(":", 1)[1]
        token = caller.set(who)
        try:
            await self.app(scope, receive, send)
        finally:
            caller.reset(token)
