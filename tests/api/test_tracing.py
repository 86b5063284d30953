"""Optional OpenTelemetry: server spans named by route template, nothing identifying recorded."""

from __future__ import annotations

from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.config import Settings
from app.domain import Scope
from app.main import create_app
from app.observability.tracing import instrument
from tests.conftest import register, wait_ready


def test_requests_become_spans_without_identifiers(migrated: Settings) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(migrated)
    instrument(app, tracer_provider=provider)
    key = register(migrated, Scope.MODELS_READ, client_id="tracer")
    with TestClient(app) as client:
        wait_ready(client)
        assert (
            client.get("/v1/models/alpha?patient=MRN-0042", headers={"Authorization": f"Bearer {key}"}).status_code
            == 200
        )
    spans = exporter.get_finished_spans()
    names = {span.name for span in spans}
    assert any("/v1/models/{name}" in name for name in names), names
    dump = repr([dict(span.attributes or {}) for span in spans])
    assert key not in dump
    assert "MRN-0042" not in dump, dump
    assert "/livez" not in names


def test_settings_switch_tracing_on(migrated: Settings) -> None:
    app = create_app(migrated.model_copy(update={"otel_enabled": True}))
    assert getattr(app, "_is_instrumented_by_opentelemetry", False)
