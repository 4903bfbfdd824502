"""Bearer JWTs from a hospital's identity provider: a real key pair, its JWKS served over HTTP on
loopback, tokens accepted or refused for the reason a real provider's would be, keys rotated."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from app.api import identity
from app.core.config import Settings
from app.main import create_app

ISSUER = "https://idp.hospital.example/realms/radiology"
AUDIENCE = "fracture-service"


def new_key(kid: str) -> tuple[object, dict]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return private, {**public, "kid": kid, "use": "sig", "alg": "RS256"}


class Jwks:
    """The provider's JWKS endpoint, on loopback; `keys` may change (a rotation)."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                owner.fetches += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/certs"


def token(private: object, kid: str, **claims: object) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "dr.jones", "iat": now, "exp": now + 300}
    return jwt.encode({**body, **claims}, private, algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def provider(monkeypatch):
    monkeypatch.setattr(identity, "REFETCH_AFTER_S", 0.0)  # a rotation is seen at once here
    jwks = Jwks()
    yield jwks
    jwks.server.shutdown()


def client(jwks: Jwks, tmp_path) -> TestClient:
    settings = Settings(
        oidc_issuer=ISSUER,
        oidc_audience=AUDIENCE,
        oidc_jwks_url=jwks.url,
        api_keys=["static-key"],
        state_dir=tmp_path,
    )
    return TestClient(create_app(settings))


def status(c: TestClient, bearer: str) -> tuple[int, str]:
    r = c.get("/metrics", headers={"Authorization": f"Bearer {bearer}"})
    return r.status_code, r.json()["detail"] if r.status_code != 200 else ""


def test_tokens_are_checked_as_a_provider_means_them(provider, tmp_path):
    private, jwk = new_key("k1")
    provider.keys = [jwk]
    c = client(provider, tmp_path)
    assert status(c, token(private, "k1"))[0] == 200
    assert status(c, "static-key")[0] == 200  # API keys keep working beside the provider
    expired = token(private, "k1", exp=int(time.time()) - 3600)
    assert status(c, expired) == (401, "the token has expired")
    code, detail = status(c, token(private, "k1", aud="another-service"))
    assert code == 401 and "InvalidAudienceError" in detail
    code, detail = status(c, token(private, "k1", iss="https://evil.example"))
    assert code == 401 and "InvalidIssuerError" in detail
    forger, _ = new_key("k1")  # the right kid, another key
    code, detail = status(c, token(forger, "k1"))
    assert code == 401 and "InvalidSignatureError" in detail
    hmac_token = jwt.encode(
        {"sub": "x"}, "a-shared-secret-of-32-bytes-long!", algorithm="HS256", headers={"kid": "k1"}
    )
    assert status(c, hmac_token) == (401, "algorithm 'HS256' is not accepted")
    assert c.get("/metrics").status_code == 401


def test_a_rotated_key_is_fetched_once_and_unknown_keys_are_refused(provider, tmp_path):
    old, old_jwk = new_key("2026-11")
    provider.keys = [old_jwk]
    c = client(provider, tmp_path)
    assert status(c, token(old, "2026-11"))[0] == 200
    new, new_jwk = new_key("2026-12")
    provider.keys = [old_jwk, new_jwk]  # the provider rotates: tokens now name the new key
    before = provider.fetches
    assert status(c, token(new, "2026-12"))[0] == 200
    assert provider.fetches == before + 1
    assert status(c, token(new, "2026-12"))[0] == 200  # cached: no fetch per request
    assert provider.fetches == before + 1
    stranger, _ = new_key("nobody")
    code, detail = status(c, token(stranger, "nobody"))
    assert code == 401 and "does not list" in detail
