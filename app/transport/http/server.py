"""The HTTP server medinfer ships: uvicorn over h11, configured from settings.

Everything about how connections are accepted and served (TLS, keep-alive, limits) is set here,
so ``medinfer serve`` and the tests that start a real server process run the same server.

The parser is h11, not httptools: h11 caps the bytes it buffers for an incomplete event (the
request line and headers) and parses them in linear time, where uvicorn's httptools protocol
accepts headers of any size and joins their pieces in quadratic time. uvicorn has no limit on
how long headers may take, how many connections a process holds or how many requests one
connection makes, and its concurrency limit counts idle connections as load;
:class:`LimitedH11Protocol` adds those and limits the requests in flight. The body-read timeout and the
body caps live in the ASGI middleware (``middleware.py``), where the body is read.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import resource
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
from uvicorn.server import ServerState

from app.config import Settings
from app.errors import OverloadedError, RequestTimeoutError
from app.transport.http.problems import PROBLEM_MEDIA_TYPE, problem_body, problem_bytes

log = logging.getLogger(__name__)

#: Descriptors a process needs besides its client connections (database pool, model files,
#: DIMSE, logs); below this many spare, the connection cap may meet EMFILE first.
SPARE_DESCRIPTORS: Final = 256
TOO_LARGE: Final = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What :class:`LimitedH11Protocol` enforces per connection and per process."""

    header_timeout_s: float
    max_connections: int
    max_requests: int
    max_header_bytes: int
    max_concurrency: int = 512
    overload_status: int = 503

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout_s=settings.http_header_timeout_s,
            max_connections=settings.http_max_connections,
            max_requests=settings.http_max_requests_per_connection,
            max_header_bytes=settings.http_max_header_bytes,
            max_concurrency=settings.http_max_concurrency,
            overload_status=settings.overload_status,
        )


def _raw_response(status: int, reason: bytes, content_type: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
        status,
        reason,
        content_type,
        len(body),
    )
    return head + body


class HeaderCappedConnection(h11.Connection):
    """An h11 server connection that refuses a request line and headers over ``max_header_bytes``.

    h11's ``max_incomplete_event_size`` bounds only what it buffers while the headers are still
    incomplete: a header block that arrives whole in one socket read (asyncio reads up to
    256 KiB) is parsed at any size. This connection measures each request's head as the bytes
    h11 takes out of its receive buffer to produce the :class:`h11.Request`, so the cap holds
    however the bytes were split, and a body or a pipelined request in the same read is not
    counted. Both refusals raise :class:`h11.RemoteProtocolError` with ``error_status_hint``
    431 and set :attr:`head_too_large`.
    """

    def __init__(self, max_header_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes = max_header_bytes
        self.head_too_large = False

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        waiting_for_head = self.their_state is h11.IDLE
        # len() of h11's buffer, not ``trailing_data`` (a copy): this runs on every read. h11 is
        # pinned (pyproject.toml) because ``_receive_buffer`` is not public API.
        buffered = len(self._receive_buffer)
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.head_too_large = exc.error_status_hint == TOO_LARGE
            raise
        head_bytes = buffered - len(self._receive_buffer)
        if waiting_for_head and isinstance(event, h11.Request) and head_bytes > self.max_header_bytes:
            self.head_too_large = True
            raise h11.RemoteProtocolError("request line and headers too long", error_status_hint=TOO_LARGE)
        return event


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection limits uvicorn lacks.

    * **Connections per process.** A connection beyond ``max_connections`` is closed as soon as it
      is accepted, before it is read, so idle half-requests cannot use up the descriptors.
    * **Header-read timeout.** From the moment a connection opens, or the first byte of the next
      request arrives on a kept-alive one, the request line and headers must be complete within
      ``header_timeout_s``; otherwise the connection is closed (with a 408 when part of a request
      came). Waiting idle between requests is uvicorn's keep-alive timeout, not this one. The
      timeout also ends a connection that keeps trickling the unread body of a request already
      answered.
    * **Requests per connection.** The ``max_requests``-th response on a connection carries
      ``Connection: close`` and the connection is closed after it.
    * **Header size.** A request line and headers longer than ``max_header_bytes`` are answered
      431 and the connection is closed, however they arrive (see :class:`HeaderCappedConnection`;
      uvicorn would answer h11's refusal with 400).

    A waiting-for-headers state needs no extra flag: the protocol is waiting exactly while its
    ``cycle`` is still the one it had when the previous response completed (or ``None``).
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn: HeaderCappedConnection = HeaderCappedConnection(limits.max_header_bytes)
        self.limits = limits
        self.requests = 0
        self.header_timer: asyncio.TimerHandle | None = None
        self.idle_cycle: RequestResponseCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            # Never joins ``self.connections``; connection_lost still runs and needs the transport.
            self.transport = transport
            transport.close()
            return
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.header_timer is None and self.cycle is self.idle_cycle:
            self._await_headers()
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        if len(self.tasks) >= self.limits.max_concurrency:
            # Requests in flight, not connections (uvicorn's own limit_concurrency counts both, so
            # a pool of idle kept-alive connections would turn every request away). A request whose
            # headers complete now is answered by ``_overloaded`` instead of the application.
            app, self.app = self.app, functools.partial(_overloaded, self.limits.overload_status)
            try:
                super().handle_events()
            finally:
                self.app = app
        else:
            super().handle_events()
        if self.cycle is before:
            return
        # A request's headers arrived (at most one per call: h11 pauses until it is answered).
        self._cancel_header_timer()
        self.requests += 1
        if self.requests >= self.limits.max_requests:
            # The cycle's task has not run yet, so its first response already sees these.
            self._close_after_response()

    def shutdown(self) -> None:
        """Graceful shutdown: the request in progress is answered with ``Connection: close``,
        as uvicorn's httptools protocol says it (its h11 protocol closes without saying so)."""
        super().shutdown()
        if self.cycle is not None and not self.cycle.response_started:
            self._close_after_response()

    def _close_after_response(self) -> None:
        self.cycle.keep_alive = False
        if CLOSE_HEADER not in self.cycle.default_headers:
            self.cycle.default_headers = [*self.cycle.default_headers, CLOSE_HEADER]

    def on_response_complete(self) -> None:
        # Before uvicorn's handler: it may start a pipelined request, which must not count as idle.
        self.idle_cycle = self.cycle
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        if not self.conn.head_too_large:
            super().send_400_response(msg)
            return
        # The head is over the cap: that is 431, which h11 hints and uvicorn drops.
        self.logger.warning("Request header fields too large.")
        # Raw bytes, not through h11: it may already hold the request, and for a HEAD it would
        # refuse to send a body (an exception out of data_received, and no answer at all).
        body = b"request line and headers exceed the size limit"
        self.transport.write(_raw_response(TOO_LARGE, TOO_LARGE.phrase.encode(), b"text/plain; charset=utf-8", body))
        self.transport.close()

    def _await_headers(self) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_timed_out(self) -> None:
        self.header_timer = None
        if self.cycle is not self.idle_cycle or self.transport.is_closing():
            return
        partial, _ = self.conn.trailing_data
        if partial and self.conn.their_state is h11.IDLE:
            body = problem_bytes(RequestTimeoutError("the request headers did not arrive in time"))
            self.transport.write(_raw_response(408, b"Request Timeout", PROBLEM_MEDIA_TYPE.encode(), body))
        self.transport.close()


async def _overloaded(status: int, _scope: Any, _receive: Any, send: Any) -> None:
    """The answer to a request beyond ``max_concurrency``: problem+json with Retry-After."""
    body = json.dumps(
        problem_body(OverloadedError("the server is handling its maximum of requests at once"), status=status),
        separators=(",", ":"),
    ).encode()
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"retry-after", b"1"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def raise_descriptor_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns the soft limit now in force.

    Python starts with the soft limit the shell gave it (often 1024), far below what the
    connection cap allows; the hard limit is what the operator (or the container runtime) set.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit", extra={"event": "http.nofile_unchanged"})
    if soft != resource.RLIM_INFINITY and soft < max_connections + SPARE_DESCRIPTORS:
        log.warning(
            "open-file limit below the connection cap",
            extra={"event": "http.nofile_low", "nofile": soft, "max_connections": max_connections},
        )
    return soft


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for :func:`uvicorn.run` (or :class:`uvicorn.Config`)."""
    config: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,
        "timeout_graceful_shutdown": 30,
        "timeout_keep_alive": settings.keep_alive_s,
        # A partial of a module-level class, so that it pickles into worker processes.
        "http": functools.partial(LimitedH11Protocol, limits=ConnectionLimits.of(settings)),
        "h11_max_incomplete_event_size": settings.http_max_header_bytes,
        # No operation speaks WebSocket; an upgraded connection would also leave the connection count.
        "ws": "none",
    }
    if settings.tls_certfile is not None:
        config |= {"ssl_certfile": str(settings.tls_certfile), "ssl_keyfile": str(settings.tls_keyfile)}
    if settings.tls_client_ca is not None:
        # Mutual TLS: the handshake fails without a certificate from this CA. Requests still
        # authenticate with an API key or bearer JWT (uvicorn does not pass the peer certificate on).
        config |= {"ssl_ca_certs": str(settings.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def serve(settings: Settings, create_app: Callable[[Settings], FastAPI]) -> None:
    """Run until stopped. With several workers each is its own process, built by ``app.main:app_factory``."""
    raise_descriptor_limit(settings.http_max_connections)
    config = uvicorn_options(settings)
    if settings.workers > 1:
        # Each worker is its own process: their metrics must meet in files to add up.
        metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="medinfer-metrics-"))
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        uvicorn.run("app.main:app_factory", factory=True, workers=settings.workers, **config)
    else:
        uvicorn.run(create_app(settings), **config)
