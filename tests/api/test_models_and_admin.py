"""Authentication, scopes, the model catalogue and live model management over HTTP."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.config import Settings
from app.domain import Scope
from tests.support.models import corrupt, write_model


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_catalogue_needs_a_key(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"
    assert "missing Authorization" in response.json()["detail"]
    assert response.headers["www-authenticate"] == 'Bearer realm="medinfer"'


def test_unknown_key_is_rejected_without_echoing_it(client: TestClient) -> None:
    response = client.get("/v1/models", headers=_auth("mi_not-a-real-key-0042"))
    assert response.status_code == 401
    assert "mi_not-a-real-key-0042" not in response.text
    assert response.headers["www-authenticate"] == 'Bearer realm="medinfer", error="invalid_token"'
    assert 'medinfer_auth_failures_total{reason="api_key"} 1.0' in client.get("/metrics").text


def test_missing_scope_is_forbidden(client: TestClient, reader_key: str) -> None:
    response = client.post("/v1/admin/models/alpha/unload", headers=_auth(reader_key))
    assert response.status_code == 403
    assert response.json()["detail"] == "scope 'models:admin' required"


def test_catalogue_lists_models_with_provenance(client: TestClient, reader_key: str) -> None:
    body = client.get("/v1/models", headers=_auth(reader_key)).json()
    names = [m["name"] for m in body["models"]]
    assert names == ["alpha", "beta"]
    alpha = body["models"][0]
    assert alpha["intended_use"] == "Automated tests of the medinfer service only."
    assert alpha["not_for_clinical_use"] is True
    assert alpha["default_threshold"] == 0.5
    assert alpha["versions"][0]["version"] == "1"
    assert len(alpha["versions"][0]["sha256"]) == 64
    assert alpha["versions"][0]["providers"][-1] == "CPUExecutionProvider"


def test_one_model_and_unknown_model(client: TestClient, reader_key: str) -> None:
    assert client.get("/v1/models/beta", headers=_auth(reader_key)).json()["versions"][0]["version"] == "2"
    response = client.get("/v1/models/gamma", headers=_auth(reader_key))
    assert response.status_code == 404
    assert response.json()["code"] == "model-not-found"


def test_reload_refuses_a_tampered_version_and_keeps_the_old_one(
    client: TestClient, admin_key: str, migrated: Settings
) -> None:
    model_dir = write_model(migrated.model_repository, "alpha", {"1": 1, "2": 5})
    corrupt(model_dir / "2" / "model.onnx")
    response = client.post("/v1/admin/models/alpha/load", headers=_auth(admin_key))
    assert response.status_code == 409
    assert response.json()["code"] == "model-integrity"
    served = client.get("/v1/models/alpha", headers=_auth(admin_key)).json()["versions"]
    assert [v["version"] for v in served] == ["1"]
    text = client.get("/metrics").text
    assert 'medinfer_model_version_ready{model="alpha",version="2"} 0.0' in text
    assert 'medinfer_model_version_ready{model="alpha",version="1"} 1.0' in text


def test_reload_serves_a_new_good_version(client: TestClient, admin_key: str, migrated: Settings) -> None:
    write_model(migrated.model_repository, "alpha", {"1": 1, "2": 5})
    response = client.post("/v1/admin/models/alpha/load", headers=_auth(admin_key))
    assert response.status_code == 200
    assert [(v["version"], v["state"]) for v in response.json()["versions"]] == [("2", "ready")]


def test_unload_then_model_is_unavailable_with_retry_after(client: TestClient, admin_key: str) -> None:
    assert client.post("/v1/admin/models/beta/unload", headers=_auth(admin_key)).status_code == 204
    response = client.get("/v1/models/beta", headers=_auth(admin_key))
    assert response.status_code == 503
    assert response.json()["code"] == "model-not-ready"
    assert response.headers["retry-after"] == "5"


def test_registered_client_key_works_with_exactly_its_scopes(client: TestClient, admin_key: str) -> None:
    created = client.post(
        "/v1/admin/clients", json={"client_id": "his-test", "scopes": ["models:read"]}, headers=_auth(admin_key)
    )
    assert created.status_code == 201
    key = created.json()["api_key"]
    assert client.get("/v1/models", headers=_auth(key)).status_code == 200
    assert client.post("/v1/admin/models/alpha/load", headers=_auth(key)).status_code == 403


def test_unknown_scope_is_a_422(client: TestClient, admin_key: str) -> None:
    response = client.post(
        "/v1/admin/clients", json={"client_id": "his-test", "scopes": ["root"]}, headers=_auth(admin_key)
    )
    assert response.status_code == 422
    assert "unknown scope" in response.json()["detail"]


def test_api_keys_are_stored_salted_and_revocation_takes_effect(
    client: TestClient, reader_key: str, migrated: Settings
) -> None:
    import sqlite3

    key_id, _, secret = reader_key.removeprefix("mi_").partition(".")
    with sqlite3.connect(migrated.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        salt, key_hash = db.execute("SELECT salt, key_hash FROM api_client WHERE key_id = ?", (key_id,)).fetchone()
        dump = "\n".join(db.iterdump())
    assert secret not in dump
    assert len(salt) == 32
    assert key_hash != __import__("hashlib").sha256(secret.encode()).hexdigest()
    assert client.get("/v1/models", headers=_auth(reader_key)).status_code == 200
    assert client.get("/v1/models", headers=_auth(f"mi_{key_id}.wrong-secret")).status_code == 401
    with sqlite3.connect(migrated.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE api_client SET revoked_at = '2026-01-01 00:00:00' WHERE key_id = ?", (key_id,))
    assert client.get("/v1/models", headers=_auth(reader_key)).status_code == 401


def test_authenticated_keys_are_cached_briefly_then_revocation_applies(migrated: Settings) -> None:
    import sqlite3
    import time

    from app.main import create_app
    from tests.conftest import register, wait_ready

    settings = migrated.model_copy(update={"auth_cache_s": 0.5})
    key = register(settings, Scope.MODELS_READ, client_id="cached")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert client.get("/v1/models", headers=_auth(key)).status_code == 200
        with sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///")) as db:
            db.execute("UPDATE api_client SET revoked_at = '2026-01-01 00:00:00'")
        assert client.get("/v1/models", headers=_auth(key)).status_code == 200  # within the cache window
        time.sleep(0.6)
        assert client.get("/v1/models", headers=_auth(key)).status_code == 401
