"""Fixtures over the real services that scripts/test-services.sh starts for `make test`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import require_env


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database owned by the service role, dropped afterwards."""
    admin_url = require_env("MEDINFER_TEST_PG_ADMIN_URL")
    base = make_url(require_env("MEDINFER_TEST_PG_URL"))
    name = f"medinfer_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" OWNER medinfer'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Served:
    base_url: str
    process: subprocess.Popen[str]
    log_path: Path
    log_handle: IO[str]

    def stop(self) -> int:
        """SIGTERM, as Kubernetes sends it; returns the exit status after the graceful drain."""
        try:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout=30)
        finally:
            self.log_handle.close()

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8").splitlines()


def medinfer(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def serve(env: dict[str, str], log_path: Path, *, wait_ready: bool = True) -> Served:
    """Start `medinfer serve` as a real process on a free loopback port."""
    port = free_port()
    env = env | {"MEDINFER_HOST": "127.0.0.1", "MEDINFER_PORT": str(port)}
    handle = log_path.open("w", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"], env=env, stdout=handle, stderr=subprocess.STDOUT, text=True
    )
    served = Served(base_url=f"http://127.0.0.1:{port}", process=process, log_path=log_path, log_handle=handle)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            handle.close()
            raise AssertionError(f"server exited {process.returncode}:\n{log_path.read_text()}")
        try:
            status = httpx.get(f"{served.base_url}/readyz", timeout=1).status_code
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if status == 200 or not wait_ready:
            return served
        time.sleep(0.1)
    process.kill()
    handle.close()
    raise AssertionError(f"server not ready in 60s:\n{log_path.read_text()}")


def base_env(tmp_path: Path, model_repo: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDINFER_") or k.startswith("MEDINFER_TEST_")}
    env |= {
        "MEDINFER_ENV": "test",
        "MEDINFER_DATA_DIR": str(tmp_path / "var"),
        "MEDINFER_MODEL_REPOSITORY": str(model_repo),
        "PYTHONUNBUFFERED": "1",
    }
    if database_url is not None:
        env["MEDINFER_DATABASE_URL"] = database_url
    return env


class PrivatePostgres:
    """A PostgreSQL cluster of one test's own, so the test may stop and restart it."""

    def __init__(self) -> None:
        self.bin = Path(require_env("MEDINFER_TEST_PG_BIN"))
        self.root = Path(tempfile.mkdtemp(prefix="medinfer-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://medinfer@127.0.0.1:{self.port}/medinfer"
        self.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        self.start()
        self._run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-q",
            "-c",
            "CREATE ROLE medinfer LOGIN",
            "-c",
            "CREATE DATABASE medinfer OWNER medinfer",
        )

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "-o", options, "start"
        )

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres()
    try:
        yield cluster
    finally:
        cluster.destroy()


def register_key(env: dict[str, str], client_id: str, *scopes: str) -> str:
    args = [arg for scope in scopes for arg in ("--scope", scope)]
    result = medinfer(env, "clients", "register", "--client-id", client_id, *args)
    assert result.returncode == 0, result.stderr
    key: str = json.loads(result.stdout)["api_key"]
    return key
