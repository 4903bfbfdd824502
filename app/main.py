"""Builds the FastAPI app: settings, models loaded once at start-up, routes, middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from app.admission import Admission
from app.api.auth import ApiKeyMiddleware
from app.api.routes import dicomweb, health, metrics, models, predict, viewer
from app.core.config import Settings, get_settings
from app.core.errors import error_response, install_handlers
from app.core.logs import configure as configure_logging
from app.core.logs import new_request_id, request_id
from app.core.metrics import Metrics
from app.dicomweb.dimse import StoreReceiver
from app.dicomweb.store import Deliverer, ResultStore
from app.runtime import ModelLoadError, ModelRegistry
from app.state import AppState

log = logging.getLogger("app")
access = logging.getLogger("app.access")
UNCOUNTED_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics")


class BodyTooLargeError(Exception):
    pass


class LimitsAndMetricsMiddleware:
    """Pure ASGI: refuses bodies over the limit (413, before or while reading) and records
    request counts, durations and in-flight requests by route template (never by request)."""

    def __init__(self, app: Any, state: AppState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.settings.max_body_bytes
        m = self.state.metrics
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
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", rid.encode()),
                ]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await _send_error(
                    send_wrapper,
                    413,
                    "body_too_large",
                    f"the body is over the limit of {limit} bytes",
                )
                return
            received = 0

            async def receive_limited() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLargeError()
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


def load_models(state: AppState) -> None:
    """Load every card's model, check sha256, warm up; readiness follows the outcome."""
    s = state.settings
    t0 = time.perf_counter()
    try:
        registry = ModelRegistry(s.models_dir, s.site_calibration)
        state.registry = registry
        registry.load_all(s.execution_provider, s.intra_op_threads)
        for role in ("classifier", "detector"):
            registry.get(role, None, getattr(s, f"default_{role}"))
    except (ModelLoadError, OSError, ValueError, KeyError) as exc:
        state.ready = False
        state.not_ready_reason = f"models failed to load: {exc}"
        log.error(state.not_ready_reason)
        return
    for mdl in registry.models.values():
        state.metrics.model_info.labels(
            mdl.role, mdl.name, mdl.version, mdl.card.sha256[:12], mdl.provider
        ).set(1)
    state.ready = True
    log.info("ready in %.2f s with %d models", time.perf_counter() - t0, len(registry.models))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    state = AppState(
        settings=settings, metrics=Metrics(), results=ResultStore(settings.result_retention_s)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.admission = Admission(
            settings.inference_workers, settings.queue_limit, state.metrics.overloaded.inc
        )
        load_models(state)
        delivery = None
        if settings.dicomweb_destination:
            basic = (
                httpx.BasicAuth(
                    settings.dicomweb_destination_username,
                    settings.dicomweb_destination_password or "",
                )
                if settings.dicomweb_destination_username
                else None
            )
            token = settings.dicomweb_destination_token
            state.deliverer = Deliverer(
                state.results,
                settings.dicomweb_destination,
                settings.delivery_retry_s,
                settings.delivery_max_backoff_s,
                settings.delivery_timeout_s,
                auth=basic,
                headers={"Authorization": f"Bearer {token}"} if token else None,
                metrics=state.metrics,
            )
            delivery = asyncio.create_task(state.deliverer.run())
        receiver = None
        if settings.dimse_port:
            receiver = StoreReceiver(
                state,
                asyncio.get_running_loop(),
                settings.dimse_host or os.environ.get("HOST", "127.0.0.1"),
                settings.dimse_port,
                settings.dimse_ae_title,
                settings.dimse_calling_ae_titles,
            )
            receiver.start()
        yield
        if receiver is not None:
            receiver.stop()
        if delivery is not None:
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await delivery

    app = FastAPI(
        title="Fracture detection service",
        version="0.1.0",
        description="Musculoskeletal radiographs (DICOM, PNG, JPEG) in; fracture probability and "
        "boxes per image and per study out, at an operating point in false positives per image.",
        lifespan=lifespan,
    )
    app.state.fracture = state
    install_handlers(app)
    for module in (predict, viewer, dicomweb, models, health, metrics):
        app.include_router(module.router)
    app.add_middleware(
        ApiKeyMiddleware, keys=settings.api_keys, metrics_public=settings.metrics_public
    )
    app.add_middleware(LimitsAndMetricsMiddleware, state=state)
    return app
