"""The server options ``medinfer serve`` passes to uvicorn, its header cap and the body deadline
(no sockets here; the served behaviour is tested in ``tests/integration/test_http_limits.py``)."""

from __future__ import annotations

import pickle
import resource
from pathlib import Path

import h11
import pytest
from uvicorn.config import Config

from app.config import Settings
from app.transport.http.middleware import MIN_BODY_RATE, body_deadline
from app.transport.http.server import (
    HeaderCappedConnection,
    LimitedH11Protocol,
    raise_descriptor_limit,
    uvicorn_options,
)

CAP = 16 * 1024


def _head(padding: int, extra: bytes = b"") -> bytes:
    return b"GET / HTTP/1.1\r\nHost: medinfer\r\nX-Padding: " + b"a" * padding + b"\r\n" + extra + b"\r\n"


def _events(connection: h11.Connection) -> list[object]:
    events: list[object] = []
    while (event := connection.next_event()) is not h11.NEED_DATA and event is not h11.PAUSED:
        events.append(event)
    return events


@pytest.mark.parametrize("size", [CAP + 1 - len(_head(0)), 17_000, 60_000, 100_000])
def test_a_head_over_the_cap_is_refused_even_when_it_arrives_whole(size: int) -> None:
    """h11 caps only an incomplete head; given whole in one read it parsed any size."""
    connection = HeaderCappedConnection(CAP)
    connection.receive_data(_head(size))
    with pytest.raises(h11.RemoteProtocolError) as refused:
        connection.next_event()
    assert refused.value.error_status_hint == 431
    assert connection.head_too_large


def test_a_head_at_the_cap_is_taken() -> None:
    connection = HeaderCappedConnection(CAP)
    connection.receive_data(_head(CAP - len(_head(0))))
    assert isinstance(connection.next_event(), h11.Request)
    assert not connection.head_too_large


def test_a_head_over_the_cap_in_pieces_is_refused_by_h11_and_marked() -> None:
    connection = HeaderCappedConnection(CAP)
    connection.receive_data(_head(CAP)[: CAP + 1])
    with pytest.raises(h11.RemoteProtocolError):
        connection.next_event()
    assert connection.head_too_large


def test_a_body_and_a_pipelined_request_do_not_count_as_head() -> None:
    connection = HeaderCappedConnection(CAP)
    body = b"b" * (4 * CAP)
    connection.receive_data(_head(CAP // 2, b"Content-Length: %d\r\n" % len(body)) + body + _head(CAP // 2))
    first = _events(connection)
    assert [type(event) for event in first[:1] + first[-1:]] == [h11.Request, h11.EndOfMessage]
    connection.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
    connection.send(h11.EndOfMessage())
    connection.start_next_cycle()
    assert [type(event) for event in _events(connection)] == [h11.Request, h11.EndOfMessage]
    assert not connection.head_too_large


def test_the_body_deadline_allows_the_timeout_plus_the_size_at_the_minimum_rate() -> None:
    assert body_deadline(100.0, 30.0, 0) == 130.0
    assert body_deadline(100.0, 30.0, 64 * 1024 * 1024) == 100.0 + 30.0 + 64 * 1024 * 1024 / MIN_BODY_RATE
    # A trickled 161-byte body under a 1 s timeout must be whole within about 1 s, not 80 s.
    assert body_deadline(0.0, 1.0, 161) < 1.01


def test_the_protocol_and_its_limits_reach_worker_processes(tmp_path: Path) -> None:
    """With several workers uvicorn pickles its config into each process: the protocol must survive."""
    settings = Settings(env="test", data_dir=tmp_path, http_max_connections=77, http_header_timeout_s=3.5)
    protocol = pickle.loads(pickle.dumps(uvicorn_options(settings)["http"]))  # noqa: S301 - our own bytes
    assert protocol.func is LimitedH11Protocol
    limits = protocol.keywords["limits"]
    assert (limits.max_connections, limits.header_timeout_s) == (77, 3.5)


def test_uvicorn_takes_the_options(tmp_path: Path) -> None:
    settings = Settings(env="test", data_dir=tmp_path, http_max_header_bytes=4096, http_max_concurrency=9)
    config = Config(app="app.main:app_factory", factory=True, **uvicorn_options(settings))
    # Requests in flight are capped by the protocol; uvicorn's limit_concurrency (which counts idle
    # connections too) stays off.
    assert (config.h11_max_incomplete_event_size, config.limit_concurrency) == (4096, None)
    assert config.http.keywords["limits"].max_concurrency == 9  # type: ignore[union-attr]


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard - 1) if hard != resource.RLIM_INFINITY else 1024
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        assert raise_descriptor_limit(max_connections=16) == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
