"""Issue 17, finding 8 (the admin trail), against a real `medinfer serve` on PostgreSQL.

- 200 anonymous 401s in one interval leave one audit event per reason, with its count (each used
  to append a permanent row);
- a duplicate ``client_id`` is a 409 (it was accepted, so a new key could act under an existing
  caller's name), and revision 0006 refuses a database that already holds duplicates;
- revoked keys are refused (``MEDINFER_AUTH_CACHE_S=0``), over HTTP and from the CLI;
- registrations, listings, revocations and 403s leave audit events, and the chain verifies;
- client ids stored before ids were restricted ("HIS Epic", "lab/prod") can be revoked, from the CLI
  and over HTTP as a percent-encoded segment (each was refused as malformed);
- while PostgreSQL is down the client routes answer 503 with Retry-After (they answered 500).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.__main__ import main as cli
from tests.integration.conftest import PrivatePostgres, base_env, medinfer, register_key, serve
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


def _assert_trail(url: str) -> None:
    """What the served test must have left in the audit trail."""
    failures = _events(url, "auth.failure")
    counts = {e["detail"]["reason"]: e["detail"]["count"] for e in failures}
    # The flood, and the two revoked keys tried once each.
    assert counts == {"missing Authorization header": FLOOD // 2, "unknown or revoked API key": FLOOD // 2 + 2}
    assert len(failures) == 2  # one per reason, not one per request
    assert all(e["actor"] is None and e["detail"]["distinct_sources"] == 1 for e in failures)
    assert "guess" not in json.dumps(failures)

    (forbidden,) = _events(url, "auth.forbidden")
    assert forbidden["actor"] == "reader"
    assert forbidden["detail"] == {"scope": "clients:admin", "operation": "listClients"}
    assert [(e["actor"], e["detail"]["client_id"]) for e in _events(url, "client.register")] == [
        ("cli", "admin"),
        ("cli", "reader"),
        ("admin", "his"),
    ]
    assert [(e["actor"], e["detail"]["client_id"]) for e in _events(url, "client.revoke")] == [
        ("admin", "his"),
        ("cli", "reader"),
    ]
    assert [e["actor"] for e in _events(url, "client.list")] == ["admin", "cli"]


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

    _assert_trail(pg_url)
    verified = medinfer(env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout.splitlines()[-1])["valid"] is True


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_revision_0006_refuses_duplicate_client_ids_and_says_how_to_fix_them(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    monkeypatch.setenv("MEDINFER_ENV", "test")
    monkeypatch.setenv("MEDINFER_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MEDINFER_DATABASE_URL", url)
    assert cli(["migrate", "--revision", "0005"]) == 0
    assert cli(["clients", "register", "--client-id", "his", "--scope", "infer"]) == 0
    keep = json.loads(capsys.readouterr().out)["api_key"].removeprefix("mi_").partition(".")[0]
    # A second key under "his", as a registration before this fix would have stored it.
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO api_client (key_id, client_id, salt, key_hash, scopes, created_at) "
                    "SELECT 'ffff0000ffff0000', client_id, salt, key_hash, scopes, created_at FROM api_client"
                )
            )
    finally:
        engine.dispose()

    with pytest.raises(RuntimeError, match=r"1 client id\(s\) hold more than one unrevoked API key") as refused:
        cli(["migrate"])
    assert "medinfer clients revoke --client-id ID --key-id KEY" in str(refused.value)

    assert cli(["clients", "list"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(c["key_id"] for c in listed) == sorted([keep, "ffff0000ffff0000"])
    assert cli(["clients", "revoke", "--client-id", "his", "--key-id", "ffff0000ffff0000"]) == 0
    assert cli(["migrate"]) == 0
    assert cli(["clients", "register", "--client-id", "his", "--scope", "infer"]) == 1
    assert "client-exists" in capsys.readouterr().err
    assert cli(["migrate", "--downgrade", "--revision", "0005"]) == 0
    assert cli(["migrate"]) == 0


def test_legacy_ids_are_revocable_and_an_outage_is_a_503_against_a_served_process(
    tmp_path: Path, private_pg: PrivatePostgres
) -> None:
    repo = tmp_path / "models"
    write_model(repo, "alpha", {"1": 1})
    env = base_env(tmp_path, repo, private_pg.url) | {"MEDINFER_AUTH_CACHE_S": "300"}
    assert medinfer(env, "migrate").returncode == 0
    admin = register_key(env, "admin", "clients:admin")
    engine = create_engine(private_pg.url)
    try:
        with engine.begin() as conn:
            for key_id, client_id in (("aaaa000000000001", "HIS Epic"), ("aaaa000000000002", "lab/prod")):
                conn.execute(
                    text(
                        "INSERT INTO api_client (key_id, client_id, salt, key_hash, scopes, created_at) "
                        "VALUES (:k, :c, 'salt', 'hash', 'infer', now())"
                    ),
                    {"k": key_id, "c": client_id},
                )
    finally:
        engine.dispose()
    revoked = medinfer(env, "clients", "revoke", "--client-id", "HIS Epic")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked_at"] is not None

    served = serve(env, tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=served.base_url, timeout=30, headers={"Authorization": f"Bearer {admin}"}) as http:
            by_http = http.post("/v1/admin/clients/lab%2Fprod/revoke")
            assert by_http.status_code == 200, by_http.text
            assert [c["client_id"] for c in by_http.json()["clients"]] == ["lab/prod"]
            listed = http.get("/v1/admin/clients")  # the admin key is now cached for 300 s
            assert all(c["revoked_at"] for c in listed.json()["clients"] if c["client_id"] != "admin")

            private_pg.stop("immediate")
            down = [http.get("/v1/admin/clients"), http.post("/v1/admin/clients/lab%2Fprod/revoke")]
            private_pg.start()
            deadline = time.monotonic() + 30
            while (back := http.get("/v1/admin/clients")).status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        assert served.stop() == 0

    assert [(r.status_code, r.json()["code"]) for r in down] == [(503, "database-unavailable")] * 2
    assert all(r.headers.get("Retry-After") == "2" for r in down)
    assert back.status_code == 200
    assert "unhandled error" not in served.log_path.read_text(encoding="utf-8")
    assert [(e["actor"], e["detail"]["client_id"]) for e in _events(private_pg.url, "client.revoke")] == [
        ("cli", "HIS Epic"),
        ("admin", "lab/prod"),
    ]
