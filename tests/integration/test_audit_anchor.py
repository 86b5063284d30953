"""The audit chain anchored outside the database, against a real server process (SQLite).

- Rollback (finding 2): save the ``audit_head`` row, let the service append events and checkpoint
  them, delete every event after the saved seq and put the row back. The chain is complete and
  self-consistent again, yet ``medinfer audit verify`` (exit 1) and ``GET /v1/audit/verify`` say
  "rollback" and name the checkpoint's seq.
- A forged checkpoint line is refused, never taken as the anchor.
- Every checkpoint counts, not only the latest: a rollback the service has written past is named
  by the checkpoint it broke, and the checkpointer refuses to sign a head that does not extend the
  last one it signed. Checkpoints of a key retired by rotation still count. A cancelled verify
  keeps its turn until its walk ends.
- Verify in bounded memory, off the event loop (finding 7b): over 50,000 events ``/livez`` keeps
  answering while verify runs, and the server's peak RSS does not grow with the chain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, event

from app.__main__ import main as cli
from app.audit.chain import Verification
from app.audit.checkpoint import (
    SUFFIX,
    Checkpointer,
    load_previous_keys,
    load_signing_key,
    load_verify_keys,
    previous_keys_dir,
    public_key_path,
)
from app.audit.recorder import AuditWriter, create_audit_engine
from app.audit.verifier import ChainVerifier
from app.config import Settings
from app.db import create_sync_engine
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


# -- review fixes: every checkpoint counts, the checkpointer refuses a regressed head, key
# rotation, one walk at a time. In process, with the real writer, checkpointer and verifier on
# a migrated SQLite database.


def _writer(settings: Settings) -> AuditWriter:
    engine = create_audit_engine(settings.sqlalchemy_url, 10)
    keys = (settings.audit_hmac_key.get_secret_value().encode(), settings.pseudonym_key.get_secret_value().encode())
    return AuditWriter(engine, *keys, Metrics())


async def _record(writer: AuditWriter, n: int, tag: str) -> int:
    seqs = [await writer.record(AuditRecord(action="load", outcome="success", actor=tag)) for _ in range(n)]
    return seqs[-1]


def _verifier(settings: Settings, reader: Engine) -> ChainVerifier:
    hmac_key = settings.audit_hmac_key.get_secret_value().encode()
    return ChainVerifier(reader, hmac_key, settings.resolved_checkpoint_dir, load_verify_keys(settings))


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(getattr(r, "reason", "")) for r in caplog.records if getattr(r, "event", "") == "audit.checkpoint_refused"
    ]


def test_a_rollback_written_past_is_refused_by_the_checkpointer_and_named_by_verify(
    migrated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpoint at seq N; restore an older head row, delete the events after it; the service
    writes new events past N. The checkpointer must not sign the rewritten head (before the fix it
    did, and verify, checking only the latest checkpoint, said valid), and verify names N."""
    settings = migrated
    reader = create_sync_engine(settings)
    database = settings.sqlalchemy_url.removeprefix("sqlite:///")
    refused: list[int] = []  # the service passes its medinfer_audit_checkpoint_refused_total counter
    checkpointer = Checkpointer(
        reader,
        load_signing_key(settings),
        settings.resolved_checkpoint_dir,
        "medinfer-0",
        on_refused=lambda: refused.append(1),
    )
    caplog.set_level(logging.INFO, logger="app.audit.checkpoint")

    async def scenario() -> tuple[int, int, Verification]:
        writer = _writer(settings)
        try:
            saved_seq = await _record(writer, 4, "before")
            with sqlite3.connect(database) as db:
                saved = db.execute("SELECT seq, hash, mac FROM audit_head WHERE id = 1").fetchone()
            signed_seq = await _record(writer, 5, "before")
            signed = checkpointer.run_once()
            assert signed is not None
            assert signed.seq == signed_seq
            with sqlite3.connect(database) as db:  # the rollback, as an owner or a restored backup does it
                db.execute("DELETE FROM audit_event WHERE seq > ?", (saved_seq,))
                db.execute("UPDATE audit_head SET seq = ?, hash = ?, mac = ? WHERE id = 1", saved)
            assert checkpointer.run_once() is None  # the head is below the signed one
            new_head = await _record(writer, 8, "after")  # written on, past the signed seq
        finally:
            await writer.aclose()
        assert new_head > signed_seq
        lines = checkpointer.path.read_bytes()
        assert checkpointer.run_once() is None
        # A restarted service remembers the last signed checkpoint from the directory.
        restarted = Checkpointer(reader, load_signing_key(settings), settings.resolved_checkpoint_dir, "medinfer-0")
        assert restarted.run_once() is None
        assert checkpointer.path.read_bytes() == lines, "no checkpoint of the rewritten head"
        return signed_seq, new_head, await _verifier(settings, reader).verify()

    try:
        signed_seq, new_head, result = asyncio.run(scenario())
    finally:
        reader.dispose()
    assert len(refused) == 2  # the first checkpointer's two refusals (the restarted one has no hook)
    assert _refusals(caplog) == [
        "head below the last signed checkpoint",
        "event at the last signed checkpoint no longer has the signed hash",
        "event at the last signed checkpoint no longer has the signed hash",
    ]
    assert result.valid is False
    assert (
        result.reason
        == f"rollback: event {signed_seq} does not have the hash of the signed checkpoint at seq {signed_seq}"
    )
    assert (result.first_broken_seq, result.checkpoint_seq, result.head_seq) == (signed_seq, signed_seq, new_head)


def test_checkpoints_signed_before_a_key_rotation_still_anchor_the_chain(
    migrated: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = migrated
    reader = create_sync_engine(settings)
    directory = settings.resolved_checkpoint_dir

    async def scenario() -> None:
        writer = _writer(settings)
        try:
            await _record(writer, 3, "old-key")
            assert Checkpointer(reader, load_signing_key(settings), directory, "medinfer-0").run_once() is not None
            # The rotation of docs/operations.md: the old public key into <key>.previous/, a new key.
            key_path = settings.resolved_checkpoint_key
            previous_keys_dir(key_path).mkdir()
            public_key_path(key_path).rename(previous_keys_dir(key_path) / "2026-12-05.pub")
            key_path.unlink()
            rotated = Checkpointer(
                reader, load_signing_key(settings), directory, "medinfer-0", previous_keys=load_previous_keys(settings)
            )
            await _record(writer, 3, "new-key")
            assert rotated.run_once() is not None, "the old key's checkpoint is the one the new head extends"
        finally:
            await writer.aclose()

    try:
        asyncio.run(scenario())
    finally:
        reader.dispose()
    assert (
        len({json.loads(line)["key_id"] for line in (directory / f"medinfer-0{SUFFIX}").read_bytes().splitlines()}) == 2
    )
    assert cli(["audit", "verify"]) == 0
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["valid"] is True, verdict


def test_a_cancelled_verify_keeps_the_turn_until_its_walk_ends(migrated: Settings) -> None:
    """Before the fix the asyncio lock was released when the request was cancelled, while its
    thread went on walking: a second walk started at once beside the first."""
    settings = migrated
    reader = create_sync_engine(settings)
    gate = threading.Event()
    entered: queue.Queue[int] = queue.Queue()

    @event.listens_for(reader, "before_cursor_execute")
    def hold(*_args: object) -> None:
        if not gate.is_set():
            entered.put(threading.get_ident())
            gate.wait(timeout=60)

    verifier = _verifier(settings, reader)

    async def scenario() -> Verification:
        first = asyncio.create_task(verifier.verify())
        await asyncio.to_thread(entered.get, timeout=30)  # the first walk is in the database, held
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(verifier.verify())
        with pytest.raises(queue.Empty):  # the second walk waits for the first to end
            await asyncio.to_thread(entered.get, timeout=1.5)
        gate.set()
        return await asyncio.wait_for(second, timeout=60)

    try:
        result = asyncio.run(scenario())
    finally:
        gate.set()
        reader.dispose()
    assert result.valid is True
