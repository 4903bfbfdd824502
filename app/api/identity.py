"""Bearer JWTs from the hospital's identity provider (OIDC): signature by a key of the issuer's
JWKS, issuer, audience and expiry checked (pyjwt). The JWKS is fetched from FRACTURE_OIDC_JWKS_URL
(or the issuer's discovery document), cached for FRACTURE_OIDC_JWKS_TTL_S, and fetched again
when a token names a key it does not hold (the provider rotated its keys), at most once every
REFETCH_AFTER_S so that forged key ids cannot make the service hammer the provider."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import jwt

log = logging.getLogger("app.auth")
REFETCH_AFTER_S = 30.0


class InvalidTokenError(Exception):
    """A bearer token that does not identify anyone: the reason, for the 401 detail."""


class JwtVerifier:
    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        ttl_s: float = 600.0,
        algorithms: tuple[str, ...] = ("RS256", "ES256", "PS256"),
        timeout_s: float = 5.0,
    ):
        self.issuer, self.audience = issuer, audience
        self.jwks_url = jwks_url
        self.ttl_s, self.algorithms, self.timeout_s = ttl_s, algorithms, timeout_s
        self.keys: dict[str, Any] = {}
        self.fetched = 0.0
        self.lock = asyncio.Lock()

    def _fetch(self) -> dict[str, Any]:
        """kid -> public key, from the JWKS (discovered from the issuer when no URL is set)."""
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
            url = self.jwks_url
            if url is None:
                discovery = f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"
                url = client.get(discovery).raise_for_status().json()["jwks_uri"]
            document = client.get(url).raise_for_status().json()
        keys = {}
        for jwk in document.get("keys", []):
            if jwk.get("use", "sig") != "sig" or "kid" not in jwk:
                continue
            try:
                keys[jwk["kid"]] = jwt.PyJWK.from_json(json.dumps(jwk)).key
            except jwt.PyJWKError:
                continue  # a key type this service does not verify with
        return keys

    async def _key(self, kid: str) -> Any:
        now = time.monotonic()
        stale = now - self.fetched > self.ttl_s
        unknown = kid not in self.keys and now - self.fetched > REFETCH_AFTER_S
        if stale or unknown:
            async with self.lock:
                if time.monotonic() - self.fetched > min(self.ttl_s, REFETCH_AFTER_S) or stale:
                    try:
                        self.keys = await asyncio.to_thread(self._fetch)
                        self.fetched = time.monotonic()
                    except (httpx.HTTPError, ValueError, KeyError) as exc:
                        log.warning("JWKS could not be fetched: %s", type(exc).__name__)
                        if not self.keys:
                            raise InvalidTokenError(
                                "the identity provider's keys are unreachable"
                            ) from None
        if kid not in self.keys:
            raise InvalidTokenError(
                "the token is signed by a key the identity provider does not list"
            )
        return self.keys[kid]

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; InvalidTokenError with the reason otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidTokenError("the bearer token is not a JWT") from None
        if header.get("alg") not in self.algorithms:
            raise InvalidTokenError(f"algorithm {header.get('alg')!r} is not accepted")
        key = await self._key(str(header.get("kid", "")))
        try:
            return jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidTokenError("the token has expired") from None
        except jwt.PyJWTError as exc:
            raise InvalidTokenError(f"the token is not valid ({type(exc).__name__})") from None
