"""A closed-loop HTTP/1.1 load generator cheap enough to share 2 cores with the server.

Each of N workers holds one keep-alive connection (raw asyncio streams, no client library) and
sends its next request when the previous answer is read. Bounded by time and by count.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    def percentile_ms(self, q: int) -> float:
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[q - 1] * 1000


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: PTH123, SIM115
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def _worker(
    *,
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    stop_at: float,
    max_requests: int,
    result: LoadResult,
    wid: int,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    n = 0
    try:
        while time.monotonic() < stop_at and n < max_requests:
            payload = make_request(wid * 1_000_000 + n)
            started = time.perf_counter()
            writer.write(payload)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in {b"\r\n", b""}:
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            await reader.readexactly(length)
            elapsed = time.perf_counter() - started
            status = int(status_line.split()[1])
            result.requests += 1
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status >= 400:
                result.errors += 1
            result.latencies.append(elapsed)
            n += 1
    finally:
        writer.close()


def run_load(
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int = 1_000_000,
) -> LoadResult:
    result = LoadResult()
    cpu_before = cpu_seconds(os.getpid())

    async def main() -> None:
        stop_at = time.monotonic() + duration_s
        await asyncio.gather(
            *(
                _worker(
                    host=host,
                    port=port,
                    make_request=make_request,
                    stop_at=stop_at,
                    max_requests=max_requests,
                    result=result,
                    wid=i,
                )
                for i in range(concurrency)
            )
        )

    started = time.perf_counter()
    asyncio.run(main())
    result.wall_s = time.perf_counter() - started
    result.client_cpu_s = cpu_seconds(os.getpid()) - cpu_before
    return result


def http_post(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
