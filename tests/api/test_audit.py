"""The audit trail over HTTP on SQLite: every inference leaves one event, verify names the first
broken link after tampering, results are withheld when the event cannot be committed."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.auditevent import AuditEvent

from app.__main__ import main as cli
from app.config import Settings
from app.domain import Scope
from app.main import create_app
from tests.conftest import register

BODY = {"id": "a-1", "inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}


@pytest.fixture
def keys(migrated: Settings) -> dict[str, str]:
    return {
        "infer": register(migrated, Scope.INFER, client_id="his-test"),
        "audit": register(migrated, Scope.AUDIT_READ, client_id="compliance"),
    }


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _db(settings: Settings) -> sqlite3.Connection:
    return sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///"))


def _infer(client: TestClient, key: str, n: int = 1) -> None:
    for i in range(n):
        body = BODY | {"id": f"a-{i}"}
        assert client.post("/v2/models/alpha/infer", json=body, headers=_auth(key)).status_code == 200


def _verify(client: TestClient, key: str) -> dict[str, object]:
    response = client.get("/v1/audit/verify", headers=_auth(key))
    assert response.status_code == 200
    result: dict[str, object] = response.json()
    return result


def test_an_inference_leaves_one_event_with_provenance_and_hashes(
    client: TestClient, keys: dict[str, str], migrated: Settings
) -> None:
    raw = json.dumps(BODY).encode()
    response = client.post(
        "/v2/models/alpha/infer",
        content=raw,
        headers=_auth(keys["infer"]) | {"Content-Type": "application/json", "X-Request-ID": "audit-me-1"},
    )
    assert response.status_code == 200
    page = client.get("/v1/audit/events", params={"action": "inference"}, headers=_auth(keys["audit"])).json()
    (event,) = page["events"]
    assert event["outcome"] == "success"
    assert event["actor"] == "his-test"
    assert event["request_id"] == "audit-me-1"
    assert event["model"] == "alpha"
    assert event["model_version"] == "1"
    served = client.get("/v1/models/alpha", headers=_auth(register(migrated, Scope.MODELS_READ, client_id="r"))).json()
    assert event["model_sha256"] == served["versions"][0]["sha256"]
    assert event["input_sha256"] == hashlib.sha256(raw).hexdigest()
    assert event["detail"]["outputs"]["probabilities"] == [response.json()["outputs"][0]["data"]]
    assert len(event["output_sha256"]) == 64


def test_failed_inferences_are_audited_too_and_anonymous_failures_are_counted(
    migrated: Settings, keys: dict[str, str]
) -> None:
    bad = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with TestClient(create_app(migrated)) as client:
        assert client.post("/v2/models/alpha/infer", json=bad, headers=_auth(keys["infer"])).status_code == 422
        assert client.get("/v1/models", headers=_auth("mi_wrong")).status_code == 401
        events = client.get("/v1/audit/events", headers=_auth(keys["audit"])).json()["events"]
        # The anonymous 401 is tallied, not written at once: one row per reason per interval.
        assert [(e["action"], e["outcome"]) for e in events] == [("inference", "failure")]
        assert events[0]["detail"] == {"error_code": "invalid-tensor"}
    # Shutdown wrote the open interval's tally.
    with sqlite3.connect(migrated.data_dir / "medinfer.db") as db:
        ((detail,),) = db.execute("SELECT detail FROM audit_event WHERE action = 'auth.failure'").fetchall()
    assert json.loads(detail)["count"] == 1
    assert "mi_wrong" not in detail


def test_verify_passes_on_an_intact_chain_and_is_itself_audited(client: TestClient, keys: dict[str, str]) -> None:
    _infer(client, keys["infer"], 5)
    result = _verify(client, keys["audit"])
    assert result["valid"] is True
    assert result["events"] == 5
    assert result["first_broken_seq"] is None
    last = client.get("/v1/audit/events", params={"action": "audit.verify"}, headers=_auth(keys["audit"])).json()
    assert last["events"][0]["outcome"] == "success"


def test_audit_needs_its_scope(client: TestClient, keys: dict[str, str]) -> None:
    response = client.get("/v1/audit/verify", headers=_auth(keys["infer"]))
    assert response.status_code == 403
    assert response.json()["detail"] == "scope 'audit:read' required"


def test_events_are_filtered_and_cursor_paged(client: TestClient, keys: dict[str, str]) -> None:
    _infer(client, keys["infer"], 5)
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"action": "inference", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/audit/events", params=params, headers=_auth(keys["audit"])).json()
        seen.extend(e["seq"] for e in page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [1, 2, 3, 4, 5]
    none = client.get("/v1/audit/events", params={"model": "beta"}, headers=_auth(keys["audit"])).json()
    assert none == {"events": [], "next_cursor": None}


def test_time_filters_mean_the_same_instant_whatever_the_offset(client: TestClient, keys: dict[str, str]) -> None:
    _infer(client, keys["infer"], 3)
    events = client.get("/v1/audit/events", params={"action": "inference"}, headers=_auth(keys["audit"])).json()
    first = datetime.fromisoformat(events["events"][0]["occurred_at"])
    for offset in (timedelta(0), timedelta(hours=5, minutes=30), timedelta(hours=-5)):
        since = (first - timedelta(seconds=1)).astimezone(timezone(offset)).isoformat()
        until = (first - timedelta(seconds=1)).astimezone(timezone(offset)).isoformat()
        after = client.get(
            "/v1/audit/events", params={"action": "inference", "since": since}, headers=_auth(keys["audit"])
        ).json()
        before = client.get(
            "/v1/audit/events", params={"action": "inference", "until": until}, headers=_auth(keys["audit"])
        ).json()
        assert len(after["events"]) == 3, since
        assert before["events"] == [], until


def test_export_is_fhir_auditevent_ndjson(client: TestClient, keys: dict[str, str]) -> None:
    _infer(client, keys["infer"], 2)
    response = client.get("/v1/audit/export", headers=_auth(keys["audit"]))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+ndjson")
    resources = [AuditEvent.model_validate_json(line) for line in response.text.splitlines()]
    assert [r.id for r in resources][:2] == ["1", "2"]
    assert resources[0].agent[0].who.identifier.value == "his-test"


def _tamper_then_verify(client: TestClient, keys: dict[str, str], settings: Settings, sql: str) -> dict[str, object]:
    _infer(client, keys["infer"], 4)
    with _db(settings) as db:
        db.executescript(sql)
    return _verify(client, keys["audit"])


@pytest.mark.parametrize(
    ("sql", "broken", "reason"),
    [
        ("UPDATE audit_event SET detail = '{\"outputs\":{}}' WHERE seq = 2", 2, "altered"),
        ("DELETE FROM audit_event WHERE seq = 3", 3, "missing"),
        (
            "UPDATE audit_event SET seq = -2 WHERE seq = 2; UPDATE audit_event SET seq = 2 WHERE seq = 3;"
            " UPDATE audit_event SET seq = 3 WHERE seq = -2;",
            2,
            "reordered",
        ),
        ("DELETE FROM audit_event WHERE seq = 4", 4, "truncated"),
        ("UPDATE audit_head SET mac = 'x'", 4, "head MAC"),
    ],
    ids=["corrupted", "deleted", "reordered", "cut-from-the-end", "forged-head"],
)
def test_verify_names_the_first_broken_link(
    client: TestClient, keys: dict[str, str], migrated: Settings, sql: str, broken: int, reason: str
) -> None:
    result = _tamper_then_verify(client, keys, migrated, sql)
    assert result["valid"] is False
    assert result["first_broken_seq"] == broken
    assert reason in str(result["reason"])


def test_a_row_rewritten_with_a_recomputed_hash_fails_on_its_mac(
    client: TestClient, keys: dict[str, str], migrated: Settings
) -> None:
    from app.audit.chain import CHAINED, canonical, link_hash

    _infer(client, keys["infer"], 3)
    with _db(migrated) as db:
        db.row_factory = sqlite3.Row
        row = dict(db.execute("SELECT * FROM audit_event WHERE seq = 3").fetchone())
        row["actor"] = "someone-else"
        from datetime import datetime

        row["occurred_at"] = datetime.fromisoformat(row["occurred_at"])
        new_hash = link_hash(row["prev_hash"], canonical({k: row[k] for k in CHAINED}))
        db.execute("UPDATE audit_event SET actor = ?, hash = ? WHERE seq = 3", ("someone-else", new_hash))
    result = _verify(client, keys["audit"])
    assert result["first_broken_seq"] == 3
    assert "MAC" in str(result["reason"])


def test_no_result_leaves_without_a_committed_event(
    client: TestClient, keys: dict[str, str], migrated: Settings
) -> None:
    _infer(client, keys["infer"], 1)
    with _db(migrated) as db:
        db.execute("ALTER TABLE audit_head RENAME TO audit_head_gone")
    response = client.post("/v2/models/alpha/infer", json=BODY, headers=_auth(keys["infer"]))
    assert response.status_code == 503
    assert response.json() == {"error": "audit trail unavailable; result withheld"}
    assert response.headers["retry-after"] == "2"
    assert "medinfer_audit_write_failures_total 1.0" in client.get("/metrics").text
    with _db(migrated) as db:
        db.execute("ALTER TABLE audit_head_gone RENAME TO audit_head")
        assert db.execute("SELECT count(*) FROM audit_event").fetchone()[0] == 1
    # The writer recovers by itself once the database does.
    assert client.post("/v2/models/alpha/infer", json=BODY, headers=_auth(keys["infer"])).status_code == 200


def test_cli_verify_exit_status_follows_the_chain(
    client: TestClient, keys: dict[str, str], migrated: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    _infer(client, keys["infer"], 2)
    assert cli(["audit", "verify"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True
    with _db(migrated) as db:
        db.execute("UPDATE audit_event SET outcome = 'failure' WHERE seq = 1")
    assert cli(["audit", "verify"]) == 1
    assert json.loads(capsys.readouterr().out)["first_broken_seq"] == 1


def test_cli_export_writes_ndjson(client: TestClient, keys: dict[str, str], tmp_path: Path) -> None:
    _infer(client, keys["infer"], 2)
    out = tmp_path / "audit.ndjson"
    assert cli(["audit", "export", "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert [json.loads(line)["resourceType"] for line in lines] == ["AuditEvent"] * len(lines)
    assert len(lines) >= 2
