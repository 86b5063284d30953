"""Faults injected into a real ``medinfer serve`` under concurrent load, for the cases that no
other test covers. Already covered elsewhere, so not repeated here:

- PostgreSQL stopped (``pg_ctl stop -m immediate``) and restarted mid-load: fail-closed 503,
  recovery, every 200 audited, chain valid (test_audit_postgres.py,
  ``test_fail_closed_while_postgres_is_down_and_recovery_after``);
- SIGKILL mid-write on PostgreSQL, then a restart on the same database
  (test_audit_postgres.py, ``test_sigkill_mid_write_leaves_a_valid_chain``);
- SIGTERM with requests queued behind the batcher: all answered 200 and audited, exit 0
  (test_shutdown.py);
- a corrupted version refused on reload while the old one keeps serving
  (tests/api/test_models_and_admin.py, tests/api/test_repository_poll.py, tests/unit/test_registry.py).
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Served, base_env, medinfer, register_key, serve

pytestmark = pytest.mark.integration

BODY = json.dumps({"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode()
PATH = "/v2/models/alpha/infer"


@dataclass(frozen=True)
class Outcome:
    request_id: str
    sent_at: float
    status: int | str  # the HTTP status, or the name of the transport error


def _port(served: Served) -> int:
    return int(served.base_url.rsplit(":", 1)[1])


def _audited_ids(env: dict[str, str]) -> list[str]:
    with sqlite3.connect(Path(env["MEDINFER_DATA_DIR"]) / "medinfer.db") as db:
        rows = db.execute(
            "SELECT request_id FROM audit_event WHERE action = 'inference' AND outcome = 'success'"
        ).fetchall()
    return [row[0] for row in rows]


def _verify(env: dict[str, str]) -> dict[str, object]:
    result = medinfer(env, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    verdict: dict[str, object] = json.loads(result.stdout)
    return verdict


def _load(served: Served, key: str, prefix: str, stop: threading.Event, out: list[Outcome]) -> None:
    """Send inferences back to back on a keep-alive connection until ``stop``; after a transport
    error, try again on a new connection (which is how a refused connection shows)."""
    n = 0
    while not stop.is_set():
        with httpx.Client(base_url=served.base_url, timeout=30) as client:
            while not stop.is_set():
                request_id = f"{prefix}-{n}"
                n += 1
                sent_at = time.monotonic()
                try:
                    response = client.post(
                        PATH,
                        content=BODY,
                        headers={
                            "Authorization": f"Bearer {key}",
                            "Content-Type": "application/json",
                            "X-Request-ID": request_id,
                        },
                    )
                except httpx.TransportError as exc:
                    out.append(Outcome(request_id, sent_at, type(exc).__name__))
                    time.sleep(0.02)
                    break
                out.append(Outcome(request_id, sent_at, response.status_code))


def _held_request(port: int, key: str, request_id: str, sent: int) -> socket.socket:
    """Open a connection and send the headers and the first ``sent`` bytes of the body only: the
    server has started this request and waits for the rest."""
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\nX-Request-ID: {request_id}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + BODY[:sent])
    return sock


def _finish(sock: socket.socket, sent: int) -> tuple[int, str]:
    """Send the rest of the body; read the answer to the end (the server closes the connection)."""
    sock.sendall(BODY[sent:])
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return int(head.split()[1]), head


def test_sigterm_under_load_answers_in_flight_requests_refuses_new_ones_and_exits_zero(
    tmp_path: Path, model_repo: Path
) -> None:
    env = base_env(tmp_path, model_repo, None)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    served = serve(env, tmp_path / "serve.log")
    port = _port(served)
    outcomes: list[Outcome] = []
    stop = threading.Event()
    half = len(BODY) // 2

    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            workers = [pool.submit(_load, served, key, f"w{i}", stop, outcomes) for i in range(6)]
            time.sleep(1.0)
            held = [_held_request(port, key, f"held-{i}", half) for i in range(3)]
            time.sleep(0.3)  # the server has read the held requests' headers
            terminated_at = time.monotonic()
            served.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            # Draining: the held requests keep the process alive, but it no longer listens.
            draining = served.process.poll() is None
            with pytest.raises(httpx.ConnectError):
                httpx.post(f"{served.base_url}{PATH}", content=BODY, headers={"Authorization": f"Bearer {key}"})
            answers = [_finish(sock, half) for sock in held]
            stop.set()
            for worker in workers:
                worker.result()
        status = served.process.wait(timeout=30)
    finally:
        if served.process.poll() is None:
            served.process.kill()
        served.log_handle.close()

    assert draining
    assert [code for code, _ in answers] == [200, 200, 200]
    assert all("connection: close" in head for _, head in answers)
    assert status == 0
    tally = Counter(o.status for o in outcomes)
    answered = [o for o in outcomes if isinstance(o.status, int)]
    assert all(o.status == 200 for o in answered), tally
    assert sum(1 for o in answered if o.sent_at < terminated_at) > 20, tally
    # A request sent before the signal (with a margin for the ones racing it) was answered, not cut.
    assert all(o.status == 200 for o in outcomes if o.sent_at < terminated_at - 0.1), tally
    # Every request sent once the drain had begun was refused at the transport, not run.
    late = [o for o in outcomes if o.sent_at > terminated_at + 0.3]
    assert late, tally
    assert all(o.status == "ConnectError" for o in late), Counter(o.status for o in late)
    # What ran was answered: exactly the 200s have audit events (nothing ran unanswered).
    ok_ids = {o.request_id for o in answered} | {f"held-{i}" for i in range(3)}
    audited = _audited_ids(env)
    assert sorted(audited) == sorted(ok_ids)
    assert '"event":"service.stop"' in served.log_path.read_text()
    assert _verify(env)["valid"] is True


def test_sigkill_under_load_on_sqlite_then_restart_keeps_every_answered_event_and_a_valid_chain(
    tmp_path: Path, model_repo: Path
) -> None:
    env = base_env(tmp_path, model_repo, None)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    served = serve(env, tmp_path / "serve.log")
    outcomes: list[Outcome] = []
    stop = threading.Event()

    with ThreadPoolExecutor(max_workers=8) as pool:
        workers = [pool.submit(_load, served, key, f"k{i}", stop, outcomes) for i in range(8)]
        time.sleep(1.5)
        served.process.send_signal(signal.SIGKILL)
        served.process.wait(timeout=10)
        served.log_handle.close()
        stop.set()
        for worker in workers:
            worker.result()

    answered = {o.request_id for o in outcomes if o.status == 200}
    assert len(answered) > 20
    assert {o.status for o in outcomes} <= {200, "ConnectError", "RemoteProtocolError", "ReadError"}
    # The kill landed mid-request: some were cut in flight, not only refused afterwards.
    assert {o.status for o in outcomes} & {"RemoteProtocolError", "ReadError"}, Counter(o.status for o in outcomes)
    # The killed process's WAL and locks are recovered by the next opener.
    verdict = _verify(env)
    assert verdict["valid"] is True
    audited = set(_audited_ids(env))
    assert answered <= audited  # no answered inference lost its event; some may be committed but unanswered

    restarted = serve(env, tmp_path / "serve-2.log")
    try:
        response = httpx.post(
            f"{restarted.base_url}{PATH}",
            content=BODY,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", "X-Request-ID": "after"},
            timeout=30,
        )
    finally:
        assert restarted.stop() == 0
    assert response.status_code == 200
    assert set(_audited_ids(env)) == audited | {"after"}
    after = _verify(env)
    assert after["valid"] is True
    assert int(str(after["events"])) > int(str(verdict["events"]))
