"""Issue 17, finding 8 (the admin trail), against a real `medinfer serve` on PostgreSQL.

- 200 anonymous 401s in one interval leave one audit event per reason, with its count (each used
  to append a permanent row);
- a duplicate ``client_id`` is a 409 (it was accepted, so a new key could act under an existing
  caller's name), and revision 0006 refuses a database that already holds duplicates;
- revoked keys are refused (``MEDINFER_AUTH_CACHE_S=0``), over HTTP and from the CLI;
- registrations, listings, revocations and 403s leave audit events, and the chain verifies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.integration.conftest import base_env, medinfer, register_key, serve
from tests.support.models import write_model

pytestmark = pytest.mark.integration

FLOOD = 200


def _events(url: str, action: str) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT actor, outcome, detail FROM audit_event WHERE action = :a ORDER BY seq"), {"a": action}
            ).all()
    finally:
        engine.dispose()
    return [{"actor": a, "outcome": o, "detail": d if isinstance(d, dict) else json.loads(d)} for a, o, d in rows]


def test_admin_trail_against_a_served_process(tmp_path: Path, pg_url: str) -> None:
    repo = tmp_path / "models"
    write_model(repo, "alpha", {"1": 1})
    env = base_env(tmp_path, repo, pg_url) | {
        "MEDINFER_AUTH_CACHE_S": "0",
        "MEDINFER_AUTH_FAILURE_INTERVAL_S": "3600",  # the whole test is one interval
    }
    assert medinfer(env, "migrate").returncode == 0
    admin = register_key(env, "admin", "clients:admin", "models:read")
    reader = register_key(env, "reader", "models:read")
    served = serve(env, tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=served.base_url, timeout=30) as http:
            for i in range(FLOOD):
                headers = {"Authorization": "Bearer mi_00ff00ff.guess"} if i % 2 else {}
                assert http.get("/v1/models", headers=headers).status_code == 401

            as_admin = {"Authorization": f"Bearer {admin}"}
            body = {"client_id": "his", "scopes": ["models:read"]}
            created = http.post("/v1/admin/clients", json=body, headers=as_admin)
            assert created.status_code == 201
            duplicate = http.post("/v1/admin/clients", json=body | {"scopes": ["infer"]}, headers=as_admin)
            assert duplicate.status_code == 409
            assert duplicate.json()["code"] == "client-exists"
            his = {"Authorization": f"Bearer {created.json()['api_key']}"}
            assert http.get("/v1/models", headers=his).status_code == 200

            assert http.get("/v1/admin/clients", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
            listed = http.get("/v1/admin/clients", headers=as_admin).json()["clients"]
            assert sorted(c["client_id"] for c in listed) == ["admin", "his", "reader"]
            assert http.post("/v1/admin/clients/his/revoke", headers=as_admin).status_code == 200
            assert http.get("/v1/models", headers=his).status_code == 401

            # The CLI against the same database while the service runs.
            listing = medinfer(env, "clients", "list")
            assert listing.returncode == 0, listing.stderr
            assert len(listing.stdout.splitlines()) == 3
            assert "key_hash" not in listing.stdout
            revoked = medinfer(env, "clients", "revoke", "--client-id", "reader")
            assert revoked.returncode == 0, revoked.stderr
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {reader}"}).status_code == 401
            again = medinfer(env, "clients", "register", "--client-id", "admin", "--scope", "infer")
            assert again.returncode == 1
            assert "client-exists" in again.stderr
    finally:
        assert served.stop() == 0

    failures = _events(pg_url, "auth.failure")
    counts = {e["detail"]["reason"]: e["detail"]["count"] for e in failures}
    assert counts == {"missing Authorization header": FLOOD // 2, "unknown or revoked API key": FLOOD // 2}
    assert len(failures) == 2  # one per reason, not one per request
    assert all(e["actor"] is None and e["detail"]["distinct_sources"] == 1 for e in failures)
    assert "guess" not in json.dumps(failures)

    (forbidden,) = _events(pg_url, "auth.forbidden")
    assert forbidden["actor"] == "reader"
    assert forbidden["detail"] == {"scope": "clients:admin", "operation": "listClients"}
    assert [(e["actor"], e["detail"]["client_id"]) for e in _events(pg_url, "client.register")] == [("admin", "his")]
    assert [(e["actor"], e["detail"]["client_id"]) for e in _events(pg_url, "client.revoke")] == [
        ("admin", "his"),
        ("cli", "reader"),
    ]
    assert [e["actor"] for e in _events(pg_url, "client.list")] == ["admin", "cli"]

    verified = medinfer(env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout.splitlines()[-1])["valid"] is True


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_revision_0006_refuses_duplicate_client_ids_and_says_how_to_fix_them(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    url = None if backend == "sqlite" else request.getfixturevalue("pg_url")
    env = base_env(tmp_path, tmp_path / "models", url)
    assert medinfer(env, "migrate", "--revision", "0005").returncode == 0
    first = register_key(env, "his", "infer")
    register_key(env, "ris", "infer")
    # A second key under "his", as a registration before this fix would have stored it.
    engine = create_engine(url or f"sqlite:///{tmp_path / 'var' / 'medinfer.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO api_client (key_id, client_id, salt, key_hash, scopes, created_at) "
                    "SELECT 'ffff0000ffff0000', client_id, salt, key_hash, scopes, created_at FROM api_client "
                    "WHERE client_id = 'his'"
                )
            )
    finally:
        engine.dispose()

    refused = medinfer(env, "migrate")
    assert refused.returncode != 0
    assert "1 client id(s) hold more than one unrevoked API key" in refused.stderr
    assert "medinfer clients revoke --client-id ID --key-id KEY" in refused.stderr

    listed = [json.loads(line) for line in medinfer(env, "clients", "list").stdout.splitlines()]
    keep = first.removeprefix("mi_").partition(".")[0]
    assert sorted(c["key_id"] for c in listed if c["client_id"] == "his") == sorted([keep, "ffff0000ffff0000"])
    fixed = medinfer(env, "clients", "revoke", "--client-id", "his", "--key-id", "ffff0000ffff0000")
    assert fixed.returncode == 0, fixed.stderr
    migrated = medinfer(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    duplicate = medinfer(env, "clients", "register", "--client-id", "his", "--scope", "infer")
    assert duplicate.returncode == 1
    assert "client-exists" in duplicate.stderr
    assert medinfer(env, "migrate", "--downgrade", "--revision", "0005").returncode == 0
