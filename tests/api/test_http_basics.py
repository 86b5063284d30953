"""The HTTP surface every client meets first: probes, request ids, and problem+json for bad input."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.domain import Scope
from app.main import create_app
from tests.conftest import register

PROBLEM = "application/problem+json"


def _assert_problem(response: object, status: int, code: str) -> dict[str, object]:
    assert getattr(response, "status_code", None) == status, getattr(response, "text", "")
    headers = response.headers  # type: ignore[attr-defined]
    assert headers["content-type"] == PROBLEM
    body: dict[str, object] = response.json()  # type: ignore[attr-defined]
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"/problems/{code}"
    assert body["request_id"] == headers["x-request-id"]
    return body


def test_livez_answers_ok(client: TestClient) -> None:
    response = client.get("/livez")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_database_and_every_model_version(client: TestClient) -> None:
    body = client.get("/readyz").json()
    assert body["ready"] is True
    assert body["checks"] == {"database": True, "models": True}
    assert [(m["model"], m["version"], m["state"]) for m in body["models"]] == [
        ("alpha", "1", "ready"),
        ("beta", "2", "ready"),
    ]
    assert all(len(m["sha256"]) == 64 for m in body["models"])


def test_a_presented_request_id_is_echoed(client: TestClient) -> None:
    response = client.get("/livez", headers={"X-Request-ID": "his-4711.a"})
    assert response.headers["x-request-id"] == "his-4711.a"


def test_a_missing_or_unsafe_request_id_is_replaced_by_a_generated_one(client: TestClient) -> None:
    generated = client.get("/livez").headers["x-request-id"]
    assert len(generated) == 36
    unsafe = client.get("/livez", headers={"X-Request-ID": "DOE^JANE <script>"}).headers["x-request-id"]
    assert unsafe != "DOE^JANE <script>"
    assert len(unsafe) == 36


def test_unknown_route_is_a_404_problem(client: TestClient) -> None:
    _assert_problem(client.get("/v1/nothing-here"), 404, "not-found")


def test_wrong_method_is_a_405_problem_with_allow(client: TestClient) -> None:
    response = client.delete("/livez")
    _assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "GET"


def test_malformed_json_is_a_400_problem(client: TestClient, admin_key: str) -> None:
    response = client.post(
        "/v1/admin/clients",
        content=b'{"client_id": "his", "scopes": [',
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )
    _assert_problem(response, 400, "malformed-body")


def test_wrong_content_type_is_a_415_problem(client: TestClient, admin_key: str) -> None:
    response = client.post(
        "/v1/admin/clients",
        content=b"client_id=his",
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    _assert_problem(response, 415, "unsupported-media-type")


def test_schema_violation_is_a_422_problem_naming_the_field_without_echoing_input(
    client: TestClient, admin_key: str
) -> None:
    response = client.post(
        "/v1/admin/clients",
        json={"client_id": "DOE^JANE 1970-01-01", "scopes": ["infer"]},
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    body = _assert_problem(response, 422, "invalid-request")
    assert "client_id" in str(body["detail"])
    assert "DOE^JANE" not in response.text


def test_oversized_body_is_refused_from_its_declared_length(client: TestClient, admin_key: str) -> None:
    response = client.post(
        "/v1/admin/clients",
        content=b"x" * (64 * 1024 + 1),
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == "payload-too-large"


def test_oversized_chunked_body_is_refused_while_streaming(client: TestClient, admin_key: str) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b" " * 8192

    response = client.post(
        "/v1/admin/clients",
        content=chunks(),
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )
    _assert_problem(response, 413, "payload-too-large")


def test_problem_types_resolve_to_their_documentation(client: TestClient) -> None:
    body = client.get("/problems/model-integrity").json()
    assert body["status"] == 409
    assert "sha256" in body["description"]
    _assert_problem(client.get("/problems/no-such-code"), 404, "not-found")


def test_metrics_use_route_templates_not_raw_paths(client: TestClient) -> None:
    client.get("/problems/model-integrity", headers={"X-Request-ID": "trace-me-123"})
    text = client.get("/metrics").text
    assert 'medinfer_http_requests_total{method="GET",route="/problems/{code}",status="200"}' in text
    assert "model-integrity" not in text
    assert "trace-me-123" not in text
    assert 'medinfer_model_version_ready{model="alpha",version="1"} 1.0' in text
    assert 'medinfer_model_execution_provider_info{model="alpha",provider="CPUExecutionProvider",version="1"}' in text


def test_access_log_lines_are_json_with_request_id_and_route(client: TestClient, capsys: object) -> None:
    import logging

    from app.observability.logging import configure_logging

    configure_logging("INFO", "json")
    try:
        client.get("/livez", headers={"X-Request-ID": "log-check-1"})
        out = capsys.readouterr().out  # type: ignore[attr-defined]
    finally:
        for handler in list(logging.getLogger().handlers):
            if getattr(handler, "_medinfer", False):
                logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("event") == "http.request" and line.get("request_id") == "log-check-1"]
    assert access
    assert access[0]["route"] == "/livez"
    assert access[0]["status"] == 200


def test_metrics_can_require_the_metrics_scope(migrated: Settings) -> None:
    settings = migrated.model_copy(update={"metrics_require_scope": True})
    reader = register(settings, Scope.METRICS_READ, client_id="prometheus")
    other = register(settings, Scope.MODELS_READ, client_id="someone")
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {other}"}).status_code == 403
        allowed = client.get("/metrics", headers={"Authorization": f"Bearer {reader}"})
        assert allowed.status_code == 200
        assert "medinfer_http_requests_total" in allowed.text


def test_access_logs_carry_the_w3c_trace_id(client: TestClient, capsys: pytest.CaptureFixture[str]) -> None:
    from app.observability.logging import configure_logging

    configure_logging("INFO", "json")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        client.get("/livez", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01", "X-Request-ID": "t-1"})
        client.get("/livez", headers={"traceparent": "garbage", "X-Request-ID": "t-2"})
        out = capsys.readouterr().out
    finally:
        for handler in list(logging.getLogger().handlers):
            if getattr(handler, "_medinfer", False):
                logging.getLogger().removeHandler(handler)
    lines = {r.get("request_id"): r for r in (json.loads(x) for x in out.splitlines() if x.startswith("{"))}
    assert lines["t-1"]["trace_id"] == trace
    assert "trace_id" not in lines["t-2"]
