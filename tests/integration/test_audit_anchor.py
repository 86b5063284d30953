"""The audit chain anchored outside the database, against a real server process (SQLite).

- Rollback (finding 2): save the ``audit_head`` row, let the service append events and checkpoint
  them, delete every event after the saved seq and put the row back. The chain is complete and
  self-consistent again, yet ``medinfer audit verify`` (exit 1) and ``GET /v1/audit/verify`` say
  "rollback" and name the checkpoint's seq.
- A forged checkpoint line is refused, never taken as the anchor.
- Verify in bounded memory, off the event loop (finding 7b): over 50,000 events ``/livez`` keeps
  answering while verify runs, and the server's peak RSS does not grow with the chain.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.audit.checkpoint import SUFFIX
from app.audit.recorder import AuditWriter, create_audit_engine
from app.config import Settings
from app.domain import AuditRecord
from app.observability.metrics import Metrics
from tests.integration.conftest import Served, base_env, medinfer, register_key, serve

pytestmark = pytest.mark.integration

BODY = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}


def _infer(served: Served, key: str, n: int) -> None:
    with httpx.Client(base_url=served.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(n):
            assert client.post("/v2/models/alpha/infer", json=BODY).status_code == 200


def _database(env: dict[str, str]) -> Path:
    return Path(env["MEDINFER_DATA_DIR"]) / "medinfer.db"


def _checkpoints(env: dict[str, str]) -> list[dict[str, object]]:
    directory = Path(env["MEDINFER_DATA_DIR"]) / "audit-checkpoints"
    return [
        json.loads(line) for path in sorted(directory.glob("*" + SUFFIX)) for line in path.read_bytes().splitlines()
    ]


def _cli_verify(env: dict[str, str]) -> tuple[int, dict[str, object]]:
    result = medinfer(env, "audit", "verify")
    verdict: dict[str, object] = json.loads(result.stdout)
    return result.returncode, verdict


def test_a_rolled_back_trail_is_reported_against_the_signed_checkpoint(tmp_path: Path, model_repo: Path) -> None:
    env = base_env(tmp_path, model_repo, None)
    assert medinfer(env, "migrate").returncode == 0
    infer_key = register_key(env, "his", "infer")
    audit_key = register_key(env, "compliance", "audit:read")
    assert _database(env).exists()

    served = serve(env, tmp_path / "serve-1.log")
    try:
        _infer(served, infer_key, 3)
        with sqlite3.connect(_database(env)) as db:
            saved = db.execute("SELECT seq, hash, mac FROM audit_head WHERE id = 1").fetchone()
        _infer(served, infer_key, 5)
    finally:
        assert served.stop() == 0  # the shutdown checkpoint anchors the final head
    checkpointed = max(int(str(c["seq"])) for c in _checkpoints(env))
    assert checkpointed >= saved[0] + 5
    logged = [json.loads(line) for line in served.log_lines() if line.startswith("{")]
    assert any(record.get("event") == "audit.checkpoint" for record in logged), "the second copy, in the logs"
    code, verdict = _cli_verify(env)
    assert (code, verdict["valid"], verdict["checkpoint_seq"]) == (0, True, checkpointed)

    # The attack: everything after the saved head goes, and the saved head row comes back.
    with sqlite3.connect(_database(env)) as db:
        db.execute("DELETE FROM audit_event WHERE seq > ?", (saved[0],))
        db.execute("UPDATE audit_head SET seq = ?, hash = ?, mac = ? WHERE id = 1", saved)

    code, verdict = _cli_verify(env)
    assert code == 1, verdict
    assert verdict["valid"] is False
    assert str(verdict["reason"]).startswith("rollback"), verdict
    assert f"seq {checkpointed}" in str(verdict["reason"])
    assert verdict["checkpoint_seq"] == checkpointed

    served = serve(env, tmp_path / "serve-2.log")
    try:
        response = httpx.get(
            f"{served.base_url}/v1/audit/verify", headers={"Authorization": f"Bearer {audit_key}"}, timeout=60
        )
    finally:
        served.stop()
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is False
    assert body["reason"].startswith("rollback"), body
    assert f"seq {checkpointed}" in body["reason"]


def test_a_forged_checkpoint_is_refused_and_reported(tmp_path: Path, model_repo: Path) -> None:
    env = base_env(tmp_path, model_repo, None)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    served = serve(env, tmp_path / "serve.log")
    try:
        _infer(served, key, 2)
    finally:
        served.stop()
    genuine = _checkpoints(env)[-1]
    # A later head the database never held, under the service's key id, signed by no one.
    forged = genuine | {"seq": int(str(genuine["seq"])) + 1000, "hash": "f" * 64}
    directory = Path(env["MEDINFER_DATA_DIR"]) / "audit-checkpoints"
    with (directory / f"intruder{SUFFIX}").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(forged) + "\n")
    code, verdict = _cli_verify(env)
    assert code == 1
    assert str(verdict["reason"]).startswith("checkpoint refused"), verdict
    assert verdict["checkpoint_seq"] == genuine["seq"], "the forged line is never the anchor"


def _bulk_events(env: dict[str, str], count: int) -> None:
    """Append ``count`` events through the real writer (group commit, one chain)."""
    settings = Settings(
        env="test", data_dir=Path(env["MEDINFER_DATA_DIR"]), model_repository=Path(env["MEDINFER_MODEL_REPOSITORY"])
    )

    async def run() -> None:
        engine = create_audit_engine(settings.sqlalchemy_url, 10)
        writer = AuditWriter(
            engine,
            settings.audit_hmac_key.get_secret_value().encode(),
            settings.pseudonym_key.get_secret_value().encode(),
            Metrics(),
        )
        try:
            for start in range(0, count, 5000):
                await asyncio.gather(*(
                    writer.record(AuditRecord(action="load", outcome="success", actor="bulk", request_id=f"b{n}"))
                    for n in range(start, min(count, start + 5000))
                ))  # fmt: skip
        finally:
            await writer.aclose()
            engine.dispose()

    asyncio.run(run())


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _livez_while(served: Served, busy: threading.Event | None, rounds: int = 0) -> list[float]:
    """Latencies of back-to-back /livez calls while ``busy`` is set (or ``rounds`` of them)."""
    latencies: list[float] = []
    with httpx.Client(base_url=served.base_url, timeout=60) as client:
        while (busy is not None and busy.is_set()) or len(latencies) < rounds:
            started = time.monotonic()
            assert client.get("/livez").status_code == 200
            latencies.append(time.monotonic() - started)
    return latencies


def test_verify_streams_a_large_chain_off_the_event_loop(tmp_path: Path, model_repo: Path) -> None:
    events = 50_000
    env = base_env(tmp_path, model_repo, None)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "compliance", "audit:read")
    _bulk_events(env, events)
    served = serve(env, tmp_path / "serve.log")
    try:
        idle = _livez_while(served, None, rounds=50)
        with httpx.Client(base_url=served.base_url, timeout=120) as client:
            headers = {"Authorization": f"Bearer {key}"}
            # Warm the same authentication and database path, not verify itself: its peak must show.
            assert client.get("/v1/audit/events", params={"limit": 1}, headers=headers).status_code == 200
            before = _peak_rss_kib(served.process.pid)
            busy = threading.Event()
            busy.set()
            outcome: dict[str, object] = {}

            def run_verify() -> None:
                started = time.monotonic()
                try:
                    outcome["response"] = client.get("/v1/audit/verify", headers=headers)
                finally:
                    outcome["seconds"] = time.monotonic() - started
                    busy.clear()

            worker = threading.Thread(target=run_verify)
            worker.start()
            during = _livez_while(served, busy)
            worker.join(timeout=120)
            after = _peak_rss_kib(served.process.pid)
    finally:
        served.stop()
    response = outcome["response"]
    assert isinstance(response, httpx.Response)
    body = response.json()
    assert body["valid"] is True, body
    assert body["events"] >= events
    print(
        f"verify of {body['events']} events: {outcome['seconds']:.2f} s; /livez answered {len(during)} times during "
        f"it, worst {max(during) * 1000:.0f} ms (idle worst {max(idle) * 1000:.0f} ms); "
        f"VmHWM {before} -> {after} KiB"
    )  # visible with -s
    assert len(during) >= 5, "the event loop did not answer /livez while verify ran"
    # The previous verify kept every row (an ORM object each) in a list: well over 100 MiB here.
    assert after - before < 32 * 1024, f"peak RSS grew by {(after - before) // 1024} MiB during verify"
