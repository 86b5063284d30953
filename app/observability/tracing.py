"""Optional OpenTelemetry tracing (``pip install medinfer[otel]``, ``MEDINFER_OTEL_ENABLED=true``).

Spans are named after route templates; no request body, header value, raw path or query string
is kept (see :func:`scrub_current_span`), so no identifier reaches the trace backend.
Exporters are configured the standard
OpenTelemetry way (``OTEL_EXPORTER_OTLP_ENDPOINT`` etc.) by the tracer provider the operator sets.
"""

from __future__ import annotations

import functools
from typing import Any

from app.errors import TracingUnavailableError


def instrument(app: Any, tracer_provider: Any = None) -> None:
    """Wrap ``app`` with OpenTelemetry's ASGI instrumentation (server spans per request)."""
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415
    except ImportError as exc:
        raise TracingUnavailableError("install the 'otel' extra to enable tracing") from exc
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        excluded_urls="livez,readyz,metrics",
        http_capture_headers_server_request=[],
        http_capture_headers_server_response=[],
    )


@functools.cache
def _trace_api() -> Any:
    """OpenTelemetry's trace API, or None without the extra (looked up once, not per request)."""
    try:
        from opentelemetry import trace  # noqa: PLC0415
    except ImportError:
        return None
    return trace


def scrub_current_span(route_template: str) -> None:
    """Replace the raw path and URL on the current server span with the route template.

    Raw paths and query strings can carry identifiers (a StudyInstanceUID in a DICOMweb path, a
    patient id in a query); the template cannot. A no-op without the ``otel`` extra.
    """
    trace = _trace_api()
    if trace is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        for attribute in ("http.target", "http.url", "url.full", "url.path"):
            span.set_attribute(attribute, route_template)
        span.set_attribute("url.query", "")
