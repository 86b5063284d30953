"""The audit trail on a real PostgreSQL: append-only triggers, a service role that owns nothing,
one valid chain under several writer processes, fail-closed while the database is down, and a
clean chain after SIGKILL."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from tests.conftest import require_env
from tests.integration.conftest import PrivatePostgres, Served, base_env, medinfer, register_key, serve

pytestmark = pytest.mark.integration

BODY = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}


def _verify(env: dict[str, str]) -> dict[str, object]:
    result = medinfer(env, "audit", "verify")
    verdict: dict[str, object] = json.loads(result.stdout)
    assert result.returncode == (0 if verdict["valid"] else 1)
    return verdict


def _count(url: str, where: str = "action = 'inference' AND outcome = 'success'") -> int:
    engine = create_engine(url.replace("+psycopg", "+psycopg"))
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM audit_event WHERE {where}")).scalar_one())  # noqa: S608
    finally:
        engine.dispose()


def _infer(served: Served, key: str, request_id: str) -> httpx.Response:
    return httpx.post(
        f"{served.base_url}/v2/models/alpha/infer",
        json=BODY,
        headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id},
        timeout=30,
    )


def test_postgres_refuses_update_delete_and_truncate_of_audit_events(
    tmp_path: Path, model_repo: Path, pg_url: str
) -> None:
    env = base_env(tmp_path, model_repo, pg_url)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    served = serve(env, tmp_path / "serve.log")
    try:
        assert _infer(served, key, "t-1").status_code == 200
    finally:
        served.stop()
    engine = create_engine(pg_url)
    try:
        for statement in ("UPDATE audit_event SET outcome = 'x'", "DELETE FROM audit_event", "TRUNCATE audit_event"):
            with engine.begin() as conn, pytest.raises(DBAPIError, match="append-only"):
                conn.execute(text(statement))
    finally:
        engine.dispose()
    assert _verify(env)["valid"] is True


def _as_service_role(pg_url: str) -> str:
    """The same database as ``pg_url``, reached as the service role scripts/test-services.sh made."""
    role = make_url(require_env("MEDINFER_TEST_PG_SERVICE_URL")).username
    return make_url(pg_url).set(username=role).render_as_string(hide_password=False)


def test_the_service_role_owns_nothing_and_cannot_touch_the_triggers(
    tmp_path: Path, model_repo: Path, pg_url: str
) -> None:
    service_url = _as_service_role(pg_url)
    role = make_url(service_url).username
    assert role is not None
    owner_env = base_env(tmp_path, model_repo, pg_url) | {"MEDINFER_DATABASE_SERVICE_ROLE": role}
    for _ in range(2):  # the grants are set again after every run, idempotently
        migrated = medinfer(owner_env, "migrate")
        assert migrated.returncode == 0, migrated.stderr
    # The service, as the service role: registers a client, serves, audits, verifies.
    env = base_env(tmp_path, model_repo, service_url)
    key = register_key(env, "his", "infer")
    served = serve(env, tmp_path / "serve.log")
    try:
        assert _infer(served, key, "as-service-role").status_code == 200
    finally:
        served.stop()
    assert _audited_request_ids(pg_url) >= {"as-service-role"}
    assert _verify(env)["valid"] is True

    engine = create_engine(service_url)
    try:
        for statement, refusal in (
            ("ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update_delete", "must be owner"),
            ("ALTER TABLE audit_event DISABLE TRIGGER ALL", "must be owner"),
            ("DROP TRIGGER audit_event_no_update_delete ON audit_event", "must be owner"),
            ("DROP TRIGGER audit_event_no_truncate ON audit_event", "must be owner"),
            ("DROP FUNCTION medinfer_audit_append_only() CASCADE", "must be owner"),
            ("DROP TABLE audit_event", "must be owner"),
            ("DELETE FROM audit_event", "permission denied"),
            ("UPDATE audit_event SET outcome = 'x'", "permission denied"),
            ("TRUNCATE audit_event", "permission denied"),
            ("DELETE FROM audit_head", "permission denied"),
            ("CREATE TABLE audit_shadow (seq bigint)", "permission denied"),
            # UPDATE is granted on the columns the service writes only (review finding): a key's
            # scopes, hash, salt or client id cannot be changed with the service's credentials.
            ("UPDATE api_client SET scopes = 'admin audit:read infer'", "permission denied"),
            ("UPDATE api_client SET key_hash = repeat('0', 64), salt = repeat('0', 32)", "permission denied"),
            ("UPDATE api_client SET client_id = 'pacs'", "permission denied"),
            ("UPDATE audit_head SET id = 2", "permission denied"),
            ("UPDATE pacs_outbox SET destination = 'elsewhere'", "permission denied"),
            ("UPDATE pacs_outbox SET sop_instance_uid = '1.2.3'", "permission denied"),
        ):
            with engine.begin() as conn, pytest.raises(DBAPIError, match=refusal):
                conn.execute(text(statement))
        # What the service does write, it still may: revoke a key (the CLI, as the service role),
        # requeue deliveries (every column the outbox updates), and move the head (served above).
        revoked = medinfer(env, "clients", "revoke", "--client-id", "his")
        assert revoked.returncode == 0, revoked.stderr
        requeued = medinfer(env, "outbox", "requeue", "--state", "failed")
        assert requeued.returncode == 0, requeued.stderr
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE pacs_outbox SET state = 'pending', attempts = 0, next_attempt_at = now(), "
                    "delivered_at = NULL, last_error = NULL, payload = NULL WHERE false"
                )
            )
        # A revoked key stays revoked, whoever asks (revision 0007's trigger).
        for url in (service_url, pg_url):
            other = create_engine(url)
            try:
                with other.begin() as conn, pytest.raises(DBAPIError, match="a revoked key stays revoked"):
                    conn.execute(text("UPDATE api_client SET revoked_at = NULL WHERE client_id = 'his'"))
            finally:
                other.dispose()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM api_client WHERE revoked_at IS NULL")).scalar_one() == 0
        with engine.connect() as conn:
            owned = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner = current_user")
            ).scalar_one()
        assert owned == 0
    finally:
        engine.dispose()
    assert _verify(env)["valid"] is True


def test_three_server_processes_keep_one_valid_chain(tmp_path: Path, model_repo: Path, pg_url: str) -> None:
    env = base_env(tmp_path, model_repo, pg_url)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    servers = [serve(env, tmp_path / f"serve-{i}.log") for i in range(3)]
    ok = 0
    lock = threading.Lock()

    def worker(index: int) -> None:
        nonlocal ok
        served = servers[index % 3]
        with httpx.Client(base_url=served.base_url, timeout=30) as client:
            for n in range(25):
                response = client.post(
                    "/v2/models/alpha/infer",
                    json=BODY,
                    headers={"Authorization": f"Bearer {key}", "X-Request-ID": f"w{index}-{n}"},
                )
                assert response.status_code == 200, response.text
                with lock:
                    ok += 1

    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            for future in [pool.submit(worker, i) for i in range(12)]:
                future.result()
    finally:
        for served in servers:
            served.stop()
    assert ok == 300
    assert _count(pg_url) == 300
    verdict = _verify(env)
    assert verdict["valid"] is True
    assert verdict["events"] >= 300


def _audited_request_ids(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                row[0]
                for row in conn.execute(
                    text("SELECT request_id FROM audit_event WHERE action = 'inference' AND outcome = 'success'")
                )
            }
    finally:
        engine.dispose()


def test_fail_closed_while_postgres_is_down_and_recovery_after(
    tmp_path: Path, model_repo: Path, private_pg: PrivatePostgres
) -> None:
    env = base_env(tmp_path, model_repo, private_pg.url)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    served = serve(env, tmp_path / "serve.log")
    results: dict[str, int] = {}
    stop = threading.Event()

    def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            request_id = f"f{worker}-{n}"
            try:
                results[request_id] = _infer(served, key, request_id).status_code
            except httpx.TransportError:
                results[request_id] = -1
            n += 1

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            workers = [pool.submit(load, i) for i in range(4)]
            time.sleep(1.0)
            private_pg.stop("immediate")
            time.sleep(1.5)
            down = [_infer(served, key, f"down-{i}") for i in range(3)]
            private_pg.start()
            back = time.monotonic()
            deadline = back + 20
            while time.monotonic() < deadline and _infer(served, key, "probe").status_code != 200:
                time.sleep(0.2)
            recovery_s = time.monotonic() - back
            time.sleep(0.5)
            stop.set()
            for worker in workers:
                worker.result()
        recovered = _infer(served, key, "after")
    finally:
        served.stop()

    assert all(r.status_code == 503 for r in down), [r.status_code for r in down]
    print(f"first 200 {recovery_s:.2f} s after PostgreSQL accepted connections again")  # visible with -s
    assert recovery_s < 5.0, "the service did not recover by itself within seconds"
    assert recovered.status_code == 200
    assert set(results.values()) <= {200, 503}, set(results.values())
    assert 503 in results.values()
    # Every 200 carried a result whose audit event is committed.
    answered = {rid for rid, status in results.items() if status == 200} | {"after"}
    assert answered <= _audited_request_ids(private_pg.url)
    assert _verify(env)["valid"] is True


def test_sigkill_mid_write_leaves_a_valid_chain(tmp_path: Path, model_repo: Path, pg_url: str) -> None:
    env = base_env(tmp_path, model_repo, pg_url)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    served = serve(env, tmp_path / "serve.log")
    answered: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                if _infer(served, key, f"k{worker}-{n}").status_code == 200:
                    answered.append(f"k{worker}-{n}")
            except httpx.TransportError:
                return
            n += 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        workers = [pool.submit(load, i) for i in range(8)]
        time.sleep(1.5)
        served.process.send_signal(signal.SIGKILL)
        served.process.wait(timeout=10)
        served.log_handle.close()
        stop.set()
        for worker in workers:
            worker.result()

    assert len(answered) > 10
    verdict = _verify(env)
    assert verdict["valid"] is True
    assert _count(pg_url) >= len(answered)
    restarted = serve(env, tmp_path / "serve-2.log")
    try:
        assert _infer(restarted, key, "after-kill").status_code == 200
    finally:
        restarted.stop()
    assert _verify(env)["valid"] is True
