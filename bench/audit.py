"""Audited vs unaudited inference throughput, measured in one run, on SQLite and PostgreSQL.

    .venv/bin/python bench/audit.py [--duration 10] [--concurrency 32] [--pg-url URL]

For each database the same model (ehr-heart-disease, whose compute is tiny, so the audit cost
shows as much as it can) is served twice on loopback: with the audit trail, and with
``MEDINFER_AUDIT_ENABLED=false`` (allowed only outside production, for this baseline). A
closed-loop generator (bench/loadgen.py) drives each at the same concurrency. Without
``--pg-url`` a private PostgreSQL cluster is started with initdb (as the postgres user when
root) and removed afterwards; on a machine without PostgreSQL the PostgreSQL rows are skipped
with a note. Prints one table and the audited/unaudited ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import cpu_seconds, http_post, run_load

ROOT = Path(__file__).resolve().parent.parent
MODEL = "ehr-heart-disease"
FEATURES = [63, 1, 1, 145, 233, 1, 2, 150, 0, 2.3, 3, 0, 6]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def private_postgres() -> Iterator[str | None]:
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        yield None
        return
    bin_dir = bins[-1].parent
    root = Path(tempfile.mkdtemp(prefix="medinfer-bench-pg-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    try:
        subprocess.run(
            _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
            check=True,
            capture_output=True,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
        subprocess.run(
            _as_postgres(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o", options, "start"]
            ),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            _as_postgres(
                [
                    str(bin_dir / "psql"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "postgres",
                    "-q",
                    "-c",
                    "CREATE ROLE medinfer LOGIN",
                    "-c",
                    "CREATE DATABASE medinfer OWNER medinfer",
                ]
            ),
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg://medinfer@127.0.0.1:{port}/medinfer"
    finally:
        subprocess.run(
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def _medinfer(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    )
    return result.stdout


@contextlib.contextmanager
def server(database_url: str | None, *, audited: bool, workdir: Path) -> Iterator[tuple[int, int, str]]:
    """Start ``medinfer serve``; yields (port, pid, api key)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDINFER_")} | {
        "MEDINFER_ENV": "test",
        "MEDINFER_DATA_DIR": str(workdir),
        "MEDINFER_MODEL_REPOSITORY": str(ROOT / "models"),
        "MEDINFER_HOST": "127.0.0.1",
        "MEDINFER_PORT": str(port),
        "MEDINFER_LOG_LEVEL": "WARNING",
        "MEDINFER_AUDIT_ENABLED": "true" if audited else "false",
        "MEDINFER_AUDIT_HMAC_KEY": "bench-" + "k" * 40,
    }
    if database_url:
        env["MEDINFER_DATABASE_URL"] = database_url
    _medinfer(env, "migrate")
    _medinfer(env, "keys", "generate", "--state", "active")
    key = json.loads(_medinfer(env, "clients", "register", "--client-id", "bench", "--scope", "infer"))["api_key"]
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1),
            ):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("server did not become ready")
        yield port, process.pid, key
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def measure(database_url: str | None, *, audited: bool, concurrency: int, duration: float) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory(prefix="medinfer-bench-") as tmp,
        server(database_url, audited=audited, workdir=Path(tmp)) as (port, pid, key),
    ):
        body = json.dumps(
            {"inputs": [{"name": "features", "shape": [1, 13], "datatype": "FP32", "data": FEATURES}]}
        ).encode()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        path = f"/v2/models/{MODEL}/infer"
        run_load("127.0.0.1", port, lambda _n: http_post(path, body, headers), concurrency=concurrency, duration_s=1.0)
        server_cpu = cpu_seconds(pid)
        result = run_load(
            "127.0.0.1", port, lambda _n: http_post(path, body, headers), concurrency=concurrency, duration_s=duration
        )
        server_cpu = cpu_seconds(pid) - server_cpu
    return {
        "throughput": result.throughput,
        "p50": result.percentile_ms(50),
        "p99": result.percentile_ms(99),
        "errors": result.errors,
        "server_cores": server_cpu / result.wall_s,
        "client_cores": result.client_cpu_s / result.wall_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pg-url", default=None)
    args = parser.parse_args()

    rows: list[tuple[str, str, dict[str, float]]] = []
    with contextlib.ExitStack() as stack:
        pg_url = args.pg_url or stack.enter_context(private_postgres())
        backends: list[tuple[str, str | None]] = [("sqlite", None)]
        if pg_url:
            backends.append(("postgresql", pg_url))
        else:
            print("note: no PostgreSQL found (apt-get install postgresql); PostgreSQL rows skipped")
        for name, url in backends:
            for audited in (False, True):
                if url:  # each run on a fresh database
                    _reset(url)
                rows.append(
                    (
                        name,
                        "audited" if audited else "unaudited",
                        measure(url, audited=audited, concurrency=args.concurrency, duration=args.duration),
                    )
                )

    print(f"\naudit overhead, {MODEL}, V2 JSON, concurrency {args.concurrency}, {args.duration:.0f} s per point")
    columns = ("database", "mode", "req/s", "p50 ms", "p99 ms", "errors", "server cores", "client cores")
    print("{:<11} {:<10} {:>8} {:>8} {:>8} {:>7} {:>13} {:>13}".format(*columns))
    for database, mode, r in rows:
        values = (r["throughput"], r["p50"], r["p99"], r["errors"], r["server_cores"], r["client_cores"])
        print("{:<11} {:<10} {:>8.1f} {:>8.2f} {:>8.2f} {:>7.0f} {:>13.2f} {:>13.2f}".format(database, mode, *values))
    print()
    for database in dict.fromkeys(d for d, _, _ in rows):
        plain = next(r for d, m, r in rows if d == database and m == "unaudited")
        audited = next(r for d, m, r in rows if d == database and m == "audited")
        ratio = audited["throughput"] / plain["throughput"]
        target = " (target >= 0.85: " + ("PASS" if ratio >= 0.85 else "MISS") + ")" if database == "postgresql" else ""
        print(f"{database}: audited / unaudited throughput = {ratio:.2f}{target}")
    return 0


def _reset(url: str) -> None:
    from sqlalchemy import create_engine, text  # noqa: PLC0415

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
