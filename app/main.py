"""Builds the FastAPI app: settings, models loaded once at start-up, routes, middleware."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from app.admission import Admission
from app.api.auth import ApiKeyMiddleware, open_paths
from app.api.errors import install_handlers
from app.api.identity import JwtVerifier
from app.api.middleware import LimitsAndMetricsMiddleware
from app.api.routes import dicomweb, feedback, health, metrics, models, predict, viewer
from app.core.config import Settings, get_settings
from app.core.logs import configure as configure_logging
from app.core.metrics import Metrics
from app.pacs.dimse import StoreReceiver
from app.pacs.ingest import recover_intake
from app.results.delivery import CStoreSender, Deliverer, Sender, StowSender
from app.results.feedback import FeedbackStore
from app.results.store import ResultStore, database_url, open_database
from app.service import FractureService

log = logging.getLogger("app")


def destination_sender(settings: Settings) -> Sender | None:
    """Where results go: a DICOMweb destination (STOW-RS), a DIMSE one (C-STORE), or none."""
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
        return StowSender(
            settings.dicomweb_destination,
            settings.delivery_timeout_s,
            auth=basic,
            headers={"Authorization": f"Bearer {token}"} if token else None,
        )
    if settings.dimse_destination:
        return CStoreSender(
            settings.dimse_destination, settings.dimse_ae_title, settings.delivery_timeout_s
        )
    return None


def document_bearer_auth(app: FastAPI, open_to_all: tuple[str, ...]) -> None:
    """The OpenAPI schema as the key middleware enforces it: a bearer scheme, and on every
    route but the open ones its requirement and the 401 it answers without a key."""
    from fastapi.openapi.utils import get_openapi

    from app.api.schemas import ERROR_MODELS

    def schema() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = spec.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "one of FRACTURE_API_KEYS",
        }
        components.setdefault("schemas", {})["Error401"] = ERROR_MODELS[401].model_json_schema()
        for path, operations in spec["paths"].items():
            if path in open_to_all:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearerAuth": []}]
                operation["responses"]["401"] = {
                    "description": "missing or wrong API key",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error401"}}
                    },
                }
        app.openapi_schema = spec
        return spec

    app.openapi = schema  # type: ignore[method-assign]


# glibc's mallopt(M_ARENA_MAX, 2): by default every thread that allocates gets an arena of its
# own (up to 8 per core), and the freed megabytes of decoding and numpy stay in each; two arenas
# hold the service's RSS after the bench under 1 GiB. Python's own allocator is unaffected.
M_ARENA_MAX = -8


def limit_malloc_arenas(count: int = 2) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, count)


def create_app(settings: Settings | None = None) -> FastAPI:
    limit_malloc_arenas()
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    engine = open_database(database_url(settings.state_dir, settings.database_url))
    service = FractureService(
        settings=settings,
        metrics=Metrics(),
        results=ResultStore(engine, settings.result_retention_s),
        feedback=FeedbackStore(engine),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.api_keys and not settings.oidc_issuer:
            log.warning(
                "no API key set (FRACTURE_API_KEYS): every endpoint is open to whoever reaches "
                "this service"
            )
        service.admission = Admission(
            settings.inference_workers, settings.queue_limit, service.metrics.overloaded.inc
        )
        service.load_models()
        batcher = service.start_batcher()
        # what a killed process had accepted and not analysed: analysed now, in the background
        # read before the C-STORE receiver opens: its new jobs are its own to analyse
        unfinished = service.results.unfinished() if service.ready else []
        recovery = asyncio.create_task(recover_intake(service, unfinished)) if unfinished else None
        delivery = None
        sender = destination_sender(settings)
        if sender is not None:
            service.deliverer = Deliverer(
                service.results,
                sender,
                settings.delivery_retry_s,
                settings.delivery_max_backoff_s,
                metrics=service.metrics,
            )
            delivery = asyncio.create_task(service.deliverer.run())
        receiver = None
        if settings.dimse_port:
            receiver = StoreReceiver(
                service,
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
        if recovery is not None:
            recovery.cancel()
        await batcher.stop()
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
    app.state.fracture = service
    install_handlers(app)
    for module in (predict, viewer, feedback, dicomweb, models, health, metrics):
        app.include_router(module.router)
    verifier = (
        JwtVerifier(
            settings.oidc_issuer,
            settings.oidc_audience,
            settings.oidc_jwks_url,
            settings.oidc_jwks_ttl_s,
        )
        if settings.oidc_issuer
        else None
    )
    if settings.api_keys or verifier is not None:
        document_bearer_auth(app, open_paths(settings.metrics_public))
    app.add_middleware(
        ApiKeyMiddleware,
        keys=settings.api_keys,
        metrics_public=settings.metrics_public,
        verifier=verifier,
    )
    app.add_middleware(LimitsAndMetricsMiddleware, service=service)
    return app
