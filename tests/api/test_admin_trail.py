"""The admin trail over HTTP and the CLI: registrations, listings, revocations and refusals are
audited; a client id names one caller; anonymous failures are counted, not stored one by one."""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.__main__ import main as cli
from app.config import Settings
from app.domain import Scope
from app.main import create_app
from app.security.failures import AuthFailureLog
from tests.conftest import register, wait_ready


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _events(settings: Settings, action: str) -> list[dict[str, Any]]:
    with sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        rows = db.execute(
            "SELECT actor, outcome, detail FROM audit_event WHERE action = ? ORDER BY seq", (action,)
        ).fetchall()
    return [{"actor": actor, "outcome": outcome, "detail": json.loads(detail)} for actor, outcome, detail in rows]


def _trail_text(settings: Settings) -> str:
    with sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        return json.dumps(db.execute("SELECT * FROM audit_event").fetchall())


def test_registration_is_audited_without_key_material(client: TestClient, admin_key: str, migrated: Settings) -> None:
    created = client.post(
        "/v1/admin/clients", json={"client_id": "his-trail", "scopes": ["infer"]}, headers=_auth(admin_key)
    )
    assert created.status_code == 201
    key = created.json()["api_key"]
    (event,) = _events(migrated, "client.register")
    assert event["actor"] == "admin"
    assert event["outcome"] == "success"
    assert event["detail"]["client_id"] == "his-trail"
    assert event["detail"]["scopes"] == ["infer"]
    assert event["detail"]["key_id"] == key.removeprefix("mi_").partition(".")[0]
    assert key.partition(".")[2] not in _trail_text(migrated)


def test_a_duplicate_client_id_is_a_409_and_the_first_key_still_works(client: TestClient, admin_key: str) -> None:
    body = {"client_id": "pacs-bridge", "scopes": ["models:read"]}
    first = client.post("/v1/admin/clients", json=body, headers=_auth(admin_key))
    assert first.status_code == 201
    again = client.post("/v1/admin/clients", json=body | {"scopes": ["clients:admin"]}, headers=_auth(admin_key))
    assert again.status_code == 409
    assert again.json()["code"] == "client-exists"
    assert "pacs-bridge" not in again.json()["detail"]
    assert client.get("/v1/models", headers=_auth(first.json()["api_key"])).status_code == 200
    listed = client.get("/v1/admin/clients", headers=_auth(admin_key)).json()["clients"]
    assert [c["client_id"] for c in listed].count("pacs-bridge") == 1


def test_a_403_is_audited_with_actor_scope_and_operation(
    client: TestClient, reader_key: str, migrated: Settings
) -> None:
    assert client.post("/v1/admin/models/alpha/unload", headers=_auth(reader_key)).status_code == 403
    assert client.get("/v1/admin/clients", headers=_auth(reader_key)).status_code == 403
    events = _events(migrated, "auth.forbidden")
    assert [(e["actor"], e["outcome"]) for e in events] == [("reader", "failure")] * 2
    assert [e["detail"] for e in events] == [
        {"scope": "models:admin", "operation": "unloadModel"},
        {"scope": "clients:admin", "operation": "listClients"},
    ]


def test_a_403_stays_a_403_when_the_trail_is_down(client: TestClient, reader_key: str, migrated: Settings) -> None:
    with sqlite3.connect(migrated.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        db.execute("ALTER TABLE audit_event RENAME TO audit_event_away")
    response = client.post("/v1/admin/models/alpha/unload", headers=_auth(reader_key))
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


def test_clients_are_listed_without_secrets_and_the_listing_is_audited(
    client: TestClient, admin_key: str, migrated: Settings
) -> None:
    key = register(migrated, Scope.INFER, client_id="his-list")
    response = client.get("/v1/admin/clients", headers=_auth(admin_key))
    assert response.status_code == 200
    clients = {c["client_id"]: c for c in response.json()["clients"]}
    assert set(clients) == {"admin", "his-list"}
    entry = clients["his-list"]
    assert entry["key_id"] == key.removeprefix("mi_").partition(".")[0]
    assert entry["scopes"] == ["infer"]
    assert entry["revoked_at"] is None
    assert entry["created_at"].endswith(("Z", "+00:00"))
    assert set(entry) == {
        "client_id",
        "key_id",
        "scopes",
        "created_at",
        "revoked_at",
        "seals_results",
        "signs_payloads",
    }
    with sqlite3.connect(migrated.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        (salt, key_hash) = db.execute("SELECT salt, key_hash FROM api_client WHERE client_id = 'his-list'").fetchone()
    assert salt not in response.text
    assert key_hash not in response.text
    assert [e["detail"] for e in _events(migrated, "client.list")] == [{"keys": 2}]


def test_revocation_applies_at_once_despite_the_cache_is_audited_and_frees_the_id(migrated: Settings) -> None:
    settings = migrated.model_copy(update={"auth_cache_s": 300.0})
    admin = register(settings, *Scope, client_id="admin")
    his = register(settings, Scope.MODELS_READ, client_id="his-revoked")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.get("/v1/models", headers=_auth(his)).status_code == 200  # now cached for 300 s
        revoked = client.post("/v1/admin/clients/his-revoked/revoke", headers=_auth(admin))
        assert revoked.status_code == 200
        (entry,) = revoked.json()["clients"]
        assert entry["revoked_at"] is not None
        assert client.get("/v1/models", headers=_auth(his)).status_code == 401
        assert client.post("/v1/admin/clients/his-revoked/revoke", headers=_auth(admin)).status_code == 200
        again = client.post(
            "/v1/admin/clients", json={"client_id": "his-revoked", "scopes": ["infer"]}, headers=_auth(admin)
        )
        assert again.status_code == 201
    events = _events(settings, "client.revoke")
    assert [(e["actor"], e["detail"]["client_id"]) for e in events] == [("admin", "his-revoked")] * 2
    assert events[0]["detail"]["key_ids"] == [entry["key_id"]]


@pytest.mark.parametrize(
    ("client_id", "status", "code"),
    [
        ("nobody-here", 404, "client-not-found"),
        ("x" * 129, 422, "invalid-request"),
        ("-leading-dash", 404, "client-not-found"),  # not registrable now, but may be stored
        ("a%01b", 422, "invalid-request"),  # a control character names nothing
        ("admin", 403, "forbidden"),  # itself: it would lock itself out
    ],
)
def test_revocation_refusals(client: TestClient, admin_key: str, client_id: str, status: int, code: str) -> None:
    response = client.post(f"/v1/admin/clients/{client_id}/revoke", headers=_auth(admin_key))
    assert response.status_code == status
    assert response.json()["code"] == code


def test_a_registration_body_is_capped_small(client: TestClient, admin_key: str, migrated: Settings) -> None:
    padding = "x" * (migrated.max_admin_body_bytes + 1)
    big = {"client_id": "his-big", "scopes": ["infer"], "encryption_jwk": {"pad": padding}}
    assert client.post("/v1/admin/clients", json=big, headers=_auth(admin_key)).status_code == 413
    assert client.post("/v1/admin/clients", json=big | {"encryption_jwk": None}).status_code == 401


def test_anonymous_failures_leave_one_counted_event_per_reason(client: TestClient, migrated: Settings) -> None:
    clock = [1_000_000.0]
    app: Any = client.app
    failures = AuthFailureLog(app.state.container.pipeline.record, 60.0, clock=lambda: clock[0])
    app.state.auth_failures = failures
    for _ in range(150):
        assert client.get("/v1/models", headers=_auth("mi_0123abcd.not-a-key")).status_code == 401
    for _ in range(50):
        assert client.get("/v1/models").status_code == 401
    assert _events(migrated, "auth.failure") == []  # nothing per request
    clock[0] += 60
    assert client.portal is not None
    assert client.portal.call(failures.run_once) == 2
    events = {e["detail"]["reason"]: e for e in _events(migrated, "auth.failure")}
    assert {reason: e["detail"]["count"] for reason, e in events.items()} == {
        "unknown or revoked API key": 150,
        "missing Authorization header": 50,
    }
    assert all(e["actor"] is None and e["outcome"] == "failure" for e in events.values())
    assert "not-a-key" not in _trail_text(migrated)
    assert 'medinfer_auth_failures_total{reason="api_key"} 200.0' in client.get("/metrics").text


def test_cli_registers_lists_and_revokes_with_an_audit_event_each(
    migrated: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["clients", "register", "--client-id", "ris-1", "--scope", "infer"]) == 0
    key = json.loads(capsys.readouterr().out)["api_key"]
    assert cli(["clients", "register", "--client-id", "ris-1", "--scope", "models:read"]) == 1
    assert "client-exists" in capsys.readouterr().err
    assert cli(["clients", "list"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["client_id"] == "ris-1"
    assert listed["key_id"] == key.removeprefix("mi_").partition(".")[0]
    assert "key_hash" not in listed
    assert "salt" not in listed
    assert cli(["clients", "revoke", "--client-id", "ris-1"]) == 0
    (revoked,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert revoked["revoked_at"] is not None
    assert cli(["clients", "revoke", "--client-id", "ris-2"]) == 1
    assert "client-not-found" in capsys.readouterr().err
    actions = [(e["actor"], e["detail"].get("client_id")) for e in _events(migrated, "client.register")]
    assert actions == [("cli", "ris-1")]
    assert _events(migrated, "client.register")[0]["detail"]["scopes"] == ["infer"]
    assert [e["detail"] for e in _events(migrated, "client.list")] == [{"keys": 1}]
    assert [e["detail"]["key_ids"] for e in _events(migrated, "client.revoke")] == [[listed["key_id"]]]
    assert cli(["audit", "verify"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True


@pytest.mark.parametrize("client_id", ["x" * 129, "", "his epic", "-x"])
def test_cli_refuses_a_client_id_the_schema_refuses(
    migrated: Settings, capsys: pytest.CaptureFixture[str], client_id: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(["clients", "register", f"--client-id={client_id}", "--scope", "infer"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "client_id must be 1-128 characters" in err
    assert client_id not in err or client_id == ""


def _store_legacy_client(settings: Settings, client_id: str, key_id: str) -> None:
    """A row as the CLI stored it before client ids were restricted (it took any string)."""
    with sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        db.execute(
            "INSERT INTO api_client (key_id, client_id, salt, key_hash, scopes, created_at) "
            "VALUES (?, ?, 'salt', 'hash', 'infer', '2024-05-01 10:00:00.000000')",
            (key_id, client_id),
        )


def _revoked_at(settings: Settings, key_id: str) -> str | None:
    with sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        (revoked_at,) = db.execute("SELECT revoked_at FROM api_client WHERE key_id = ?", (key_id,)).fetchone()
    return revoked_at  # type: ignore[no-any-return]


def test_ids_stored_before_ids_were_restricted_can_be_revoked_by_cli_and_http(
    client: TestClient, admin_key: str, migrated: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy = {"HIS Epic": "aaaa000000000001", "lab/prod": "aaaa000000000002", "ris 2/a b": "aaaa000000000003"}
    for client_id, key_id in legacy.items():
        _store_legacy_client(migrated, client_id, key_id)

    assert cli(["clients", "revoke", "--client-id", "HIS Epic"]) == 0
    (revoked,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (revoked["client_id"], revoked["key_id"]) == ("HIS Epic", legacy["HIS Epic"])
    assert _revoked_at(migrated, legacy["HIS Epic"]) is not None

    # Over HTTP an id is one percent-encoded path segment; "/" travels as %2F.
    by_http = client.post("/v1/admin/clients/lab%2Fprod/revoke", headers=_auth(admin_key))
    assert by_http.status_code == 200, by_http.text
    assert [(c["client_id"], c["key_id"]) for c in by_http.json()["clients"]] == [("lab/prod", legacy["lab/prod"])]
    spaced = client.post("/v1/admin/clients/ris%202%2Fa%20b/revoke", headers=_auth(admin_key))
    assert spaced.status_code == 200, spaced.text
    assert all(_revoked_at(migrated, key_id) is not None for key_id in legacy.values())

    events = [
        (e["actor"], e["detail"]["client_id"], e["detail"]["key_ids"]) for e in _events(migrated, "client.revoke")
    ]
    assert events == [
        ("cli", "HIS Epic", [legacy["HIS Epic"]]),
        ("admin", "lab/prod", [legacy["lab/prod"]]),
        ("admin", "ris 2/a b", [legacy["ris 2/a b"]]),
    ]
    # A new registration still takes only the strict form.
    refused = client.post(
        "/v1/admin/clients", json={"client_id": "HIS Epic", "scopes": ["infer"]}, headers=_auth(admin_key)
    )
    assert refused.status_code == 422


@pytest.mark.parametrize("client_id", ["x" * 129, "", "a\x01b", "tab\there"])
def test_cli_revoke_refuses_only_what_no_registration_could_have_stored(
    migrated: Settings, capsys: pytest.CaptureFixture[str], client_id: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(["clients", "revoke", f"--client-id={client_id}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "client_id must be 1-128 characters without control characters" in err
    assert client_id not in err or client_id == ""


def test_client_routes_answer_503_while_the_client_store_is_unreachable(migrated: Settings) -> None:
    settings = migrated.model_copy(update={"auth_cache_s": 300.0})
    admin = register(settings, *Scope, client_id="admin")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.get("/v1/admin/clients", headers=_auth(admin)).status_code == 200  # admin now cached
        with sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///")) as db:
            db.execute("ALTER TABLE api_client RENAME TO api_client_away")
        answers = [
            client.get("/v1/admin/clients", headers=_auth(admin)),
            client.post("/v1/admin/clients/his/revoke", headers=_auth(admin)),
            client.post("/v1/admin/clients", json={"client_id": "his", "scopes": ["infer"]}, headers=_auth(admin)),
        ]
    assert [(r.status_code, r.json()["code"]) for r in answers] == [(503, "database-unavailable")] * 3
    assert all(r.headers["Retry-After"] == "2" for r in answers)
    assert all("api_client" not in r.text for r in answers)


def test_an_unaudited_registration_whose_undo_fails_answers_the_audit_error_and_logs_the_key_id(
    client: TestClient, admin_key: str, migrated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with sqlite3.connect(migrated.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        db.execute("ALTER TABLE audit_event RENAME TO audit_event_away")
        # The undo (an UPDATE of revoked_at) fails as it would with the database gone.
        db.execute("CREATE TRIGGER no_undo BEFORE UPDATE ON api_client BEGIN SELECT RAISE(ABORT, 'down'); END")
    with caplog.at_level(logging.ERROR, logger="app"):
        response = client.post(
            "/v1/admin/clients", json={"client_id": "his-undo", "scopes": ["infer"]}, headers=_auth(admin_key)
        )
    assert response.status_code == 503
    assert response.json()["code"] == "audit-unavailable"
    assert "api_key" not in response.text
    with sqlite3.connect(migrated.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        (key_id,) = db.execute("SELECT key_id FROM api_client WHERE client_id = 'his-undo'").fetchone()
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "client.register_undo_failed"]
    assert record.key_id == key_id  # type: ignore[attr-defined]
    assert "his-undo" not in record.getMessage()
