"""Scaling out on one machine: uvicorn workers whose metrics add up, and three replicas behind
nginx sharing one PostgreSQL with one valid audit chain."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Served, base_env, free_port, medinfer, register_key, serve

pytestmark = pytest.mark.integration

BODY = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
_OK = re.compile(r'^medinfer_inference_requests_total\{model="alpha",outcome="ok",version="1"\} (\S+)$', re.M)


def _ok_count(text: str) -> float:
    match = _OK.search(text)
    return float(match.group(1)) if match else 0.0


def test_two_workers_report_the_sum_of_their_counts(tmp_path: Path, model_repo: Path) -> None:
    env = base_env(tmp_path, model_repo, None) | {"MEDINFER_WORKERS": "2"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    served = serve(env, tmp_path / "serve.log")
    try:
        for i in range(40):  # a fresh connection each time, so both workers take requests
            response = httpx.post(
                f"{served.base_url}/v2/models/alpha/infer",
                json=BODY,
                headers={"Authorization": f"Bearer {key}", "X-Request-ID": f"m{i}"},
            )
            assert response.status_code == 200
        scrapes = [httpx.get(f"{served.base_url}/metrics").text for _ in range(6)]
    finally:
        assert served.stop() == 0
    pids = {
        line["pid"]
        for line in map(json.loads, served.log_lines())
        if line.get("event") == "http.request" and str(line.get("request_id", "")).startswith("m")
    }
    assert len(pids) == 2, "both workers should have served requests"
    assert [_ok_count(text) for text in scrapes] == [40.0] * 6


def _nginx_config(root: Path, port: int, upstreams: list[Served]) -> Path:
    servers = "\n".join(f"        server {s.base_url.removeprefix('http://')};" for s in upstreams)
    config = root / "nginx.conf"
    config.write_text(
        f"""
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream medinfer {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://medinfer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Request-ID $http_x_request_id;
        }}
    }}
}}
""",
        encoding="utf-8",
    )
    return config


@pytest.fixture
def nginx() -> Iterator[Path]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed: run the suite with `make test`, which installs it")
    root = Path(tempfile.mkdtemp(prefix="medinfer-nginx-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_three_replicas_behind_nginx_share_one_chain_and_their_metrics_add_up(
    tmp_path: Path, model_repo: Path, pg_url: str, nginx: Path
) -> None:
    env = base_env(tmp_path, model_repo, pg_url)
    assert medinfer(env, "migrate").returncode == 0
    key = register_key(env, "his", "infer")
    replicas = [serve(env, tmp_path / f"replica-{i}.log") for i in range(3)]
    port = free_port()
    proxy = subprocess.Popen(
        [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(_nginx_config(nginx, port, replicas)), "-p", str(nginx)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/livez").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

        def worker(index: int) -> int:
            ok = 0
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                for n in range(20):
                    response = client.post(
                        "/v2/models/alpha/infer",
                        json=BODY,
                        headers={"Authorization": f"Bearer {key}", "X-Request-ID": f"n{index}-{n}"},
                    )
                    assert response.status_code == 200, response.text
                    ok += 1
            return ok

        with ThreadPoolExecutor(max_workers=9) as pool:
            answered = sum(pool.map(worker, range(9)))
        per_replica = [_ok_count(httpx.get(f"{r.base_url}/metrics").text) for r in replicas]
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        for replica in replicas:
            replica.stop()

    assert answered == 180
    assert sum(per_replica) == 180
    assert all(count > 0 for count in per_replica), per_replica
    verdict = json.loads(medinfer(env, "audit", "verify").stdout)
    assert verdict["valid"] is True
    assert verdict["events"] >= 180
