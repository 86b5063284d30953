"""SIGTERM under load: requests already accepted are answered (and audited), then exit 0."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.conftest import base_env, medinfer, register_key, serve
from tests.support.models import write_heavy_model

pytestmark = pytest.mark.integration


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_heavy_model(repo, layers=12)
    env = base_env(tmp_path, repo, None)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    served = serve(env, tmp_path / "serve.log")
    x = np.random.default_rng(2).normal(size=(1, 1024)).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 1024], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ]
        }
    ).encode()
    headers = {"Authorization": f"Bearer {key}", "Inference-Header-Content-Length": str(len(header))}
    sent = threading.Barrier(41)

    def call(i: int) -> int | str:
        with httpx.Client(base_url=served.base_url, timeout=60) as client:
            request = client.build_request(
                "POST",
                "/v2/models/heavy/infer",
                content=header + x.tobytes(),
                headers=headers | {"X-Request-ID": f"d{i}"},
            )
            sent.wait()
            try:
                return client.send(request).status_code
            except httpx.TransportError as exc:
                return type(exc).__name__

    with ThreadPoolExecutor(max_workers=40) as pool:
        futures = [pool.submit(call, i) for i in range(40)]
        sent.wait()
        time.sleep(0.3)  # all 40 are on the wire and queued behind the batcher
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    status = served.process.wait(timeout=60)
    served.log_handle.close()
    drain_s = time.monotonic() - started

    assert results == [200] * 40, results
    assert status == 0
    assert drain_s < 30
    database = Path(env["MEDINFER_DATA_DIR"]) / "medinfer.db"
    with sqlite3.connect(database) as db:
        audited = db.execute(
            "SELECT count(*) FROM audit_event WHERE action = 'inference' AND outcome = 'success'"
        ).fetchone()[0]
    assert audited == 40
    log = served.log_path.read_text()
    assert '"event":"service.stop"' in log
