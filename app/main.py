"""``create_app(settings)``: the FastAPI application, its middleware, handlers and lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from app.config import Settings, load_settings, service_version
from app.container import Container
from app.feedback import build_feedback
from app.imaging.service import build_imaging
from app.observability.logging import configure_logging
from app.observability.metrics import Metrics
from app.observability.tracing import instrument
from app.security.failures import AuthFailureLog
from app.transport.dimse.node import dimse_scp, pacs_sender
from app.transport.dimse.scp import REJECTED
from app.transport.http import (
    routes_admin,
    routes_audit,
    routes_dicomweb,
    routes_feedback,
    routes_models,
    routes_ops,
    routes_predict,
    routes_v2,
)
from app.transport.http.deps import get_principal
from app.transport.http.middleware import RequestContextMiddleware
from app.transport.http.problems import install_problem_handlers, normalise_openapi_errors
from app.transport.http.schemas import ClientRegistration, FeedbackRequest, Problem
from app.transport.http.v2_codec import V2InferRequest, V2InferResponse

log = logging.getLogger(__name__)

TAGS = [
    {"name": "operations", "description": "Health probes, metrics and problem-type documentation."},
    {"name": "models", "description": "The model catalogue and its provenance."},
    {
        "name": "predict",
        "description": "Patient records and DICOM studies in, decisions with provenance out (JSON, FHIR or DICOM SR).",
    },
    {
        "name": "dicomweb",
        "description": "DICOMweb STOW-RS for PACS: studies are stored, inferred asynchronously, and their DICOM SR "
        "sent back to the configured PACS. Responses are application/dicom+json.",
    },
    {
        "name": "monitoring",
        "description": "Post-market monitoring: confirmed outcomes of results, and the running sensitivity, "
        "specificity and calibration of each model version.",
    },
    {"name": "admin", "description": "Live model management and client registration."},
    {"name": "audit", "description": "The tamper-evident audit trail: verify, list, export (FHIR AuditEvent)."},
    {
        "name": "open-inference-protocol",
        "description": "KServe/Triton Open Inference Protocol v2 with the binary tensor extension. "
        'Errors in this family are `{"error": "..."}`, as the protocol defines.',
    },
]

DESCRIPTION = """\
medinfer serves diagnostic ONNX models to hospital systems. Every error is an RFC 9457
`application/problem+json` document whose `type` resolves to `/problems/{code}`.
Authenticate with `Authorization: Bearer <api key>`; each operation names the scope it needs.
Send `X-Request-ID` to correlate; the service echoes it (or a generated one) on every response.
"""


#: Models that the document references by hand (problem+json bodies, v2 bodies read raw for speed,
#: JSON bodies read only after authentication: ``bodies.authenticated_json``).
DOCUMENTED_MODELS = (Problem, V2InferRequest, V2InferResponse, FeedbackRequest, ClientRegistration)


ROUTERS = (
    routes_ops.router,
    routes_models.router,
    routes_predict.router,
    routes_admin.router,
    routes_audit.router,
    routes_v2.router,
    routes_dicomweb.router,
    routes_feedback.router,
)


def _operations_needing_a_principal() -> Iterator[str]:
    def needs(dependant: Dependant) -> bool:
        return dependant.call is get_principal or any(needs(d) for d in dependant.dependencies)

    for router in ROUTERS:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.operation_id and needs(route.dependant):
                yield route.operation_id


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
            servers=[{"url": "http://127.0.0.1:8000", "description": "make run (dev defaults)"}],
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for model in DOCUMENTED_MODELS:
            generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(generated.pop("$defs", {}))
            schemas[model.__name__] = generated
        components["schemas"]["V2Error"] = {
            "type": "object",
            "title": "V2Error",
            "description": "Open Inference Protocol error body.",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
            "example": {"error": "input 'image': dimension 2 is 128, model expects 224 (shape [-1, 1, 224, 224])"},
        }
        components["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "API key issued by registerClient."}
        }
        normalise_openapi_errors(schema)
        protected = set(_operations_needing_a_principal())
        for item in schema["paths"].values():
            for operation in item.values():
                if operation.get("operationId") in protected:
                    operation["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def _dimse_counter(metrics: Metrics) -> Callable[[str, str], None]:
    """The SCP's ``on_event`` hook: associations and connections refused, by reason."""

    def count(outcome: str, code: str) -> None:
        if outcome == REJECTED:
            metrics.dimse_rejections.labels(reason=code).inc()

    return count


def create_app(settings: Settings) -> FastAPI:
    """The application for ``settings``. Building it performs no I/O; the lifespan does."""
    metrics = Metrics(service_version())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        container = Container.build(settings, metrics)
        imaging = build_imaging(container, pacs_sender(settings))
        feedback = build_feedback(container)
        app.state.container = container
        app.state.imaging = imaging
        app.state.feedback = feedback
        await container.start()
        await imaging.start()
        await feedback.start()
        # Anonymous authentication failures, counted per reason per interval (one audit row each).
        auth_failures = AuthFailureLog(container.pipeline.record, settings.auth_failure_interval_s)
        auth_failures.start()
        app.state.auth_failures = auth_failures
        scp = dimse_scp(settings, imaging, on_event=_dimse_counter(metrics))
        try:
            if scp is not None:
                await asyncio.to_thread(scp.start)
                app.state.dimse_port = scp.port
                log.info("DIMSE SCP listening", extra={"event": "dimse.listening", "port": scp.port})
            yield
        finally:
            if scp is not None:
                await asyncio.to_thread(scp.stop)
            await feedback.aclose()
            await imaging.aclose()
            await auth_failures.aclose()  # its last counts reach the trail before the audit writer closes
            await container.aclose()
            metrics.mark_process_dead()

    app = FastAPI(
        title="medinfer",
        version=service_version(),
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.overload_status = settings.overload_status
    install_problem_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        max_admin_body_bytes=settings.max_admin_body_bytes,
        body_timeout_s=settings.http_body_timeout_s,
    )
    if settings.otel_enabled:
        instrument(app)
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory`` with several workers: settings from the environment.

    Each worker is a fresh process, so it sets up its own JSON logging here.
    """
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)
