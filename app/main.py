"""``create_app(settings)``: the FastAPI application, its middleware, handlers and lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.config import Settings, load_settings
from app.container import Container
from app.observability.metrics import Metrics
from app.transport.http import routes_admin, routes_models, routes_ops
from app.transport.http.middleware import RequestContextMiddleware
from app.transport.http.problems import install_problem_handlers, normalise_openapi_errors
from app.transport.http.schemas import Problem

TAGS = [
    {"name": "operations", "description": "Health probes, metrics and problem-type documentation."},
    {"name": "models", "description": "The model catalogue and its provenance."},
    {"name": "admin", "description": "Live model management and client registration."},
]

DESCRIPTION = """\
medinfer serves diagnostic ONNX models to hospital systems. Every error is an RFC 9457
`application/problem+json` document whose `type` resolves to `/problems/{code}`.
Authenticate with `Authorization: Bearer <api key>`; each operation names the scope it needs.
Send `X-Request-ID` to correlate; the service echoes it (or a generated one) on every response.
"""


def service_version() -> str:
    try:
        return version("medinfer")
    except PackageNotFoundError:
        return "0.0.0+unknown"


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
        components.setdefault("schemas", {}).update(
            Problem.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs", {})
        )
        components["schemas"]["Problem"] = {
            k: v
            for k, v in Problem.model_json_schema(ref_template="#/components/schemas/{model}").items()
            if k != "$defs"
        }
        components["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "API key issued by registerClient."}
        }
        normalise_openapi_errors(schema)
        for path, item in schema["paths"].items():
            for operation in item.values():
                if path.startswith("/v1/"):
                    operation["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings) -> FastAPI:
    """The application for ``settings``. Building it performs no I/O; the lifespan does."""
    metrics = Metrics()
    metrics.build_info.info({"version": service_version()})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        container = Container.build(settings, metrics)
        app.state.container = container
        await container.start()
        try:
            yield
        finally:
            await container.aclose()

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
    install_problem_handlers(app)
    for router in (routes_ops.router, routes_models.router, routes_admin.router):
        app.include_router(router)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory`` with several workers: settings from the environment."""
    return create_app(load_settings())
