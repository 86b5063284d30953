"""Pure ASGI middleware: request ids, body-size caps, body-read timeout, access log and HTTP metrics.

Pure ASGI (not ``BaseHTTPMiddleware``) so that streaming bodies are not buffered and the cap is
enforced as bytes arrive, before the application reads the whole body. Administration bodies
(``/v1/admin/*``, small JSON documents) have their own small cap, applied here before routing and
authentication, by Content-Length and by counting streamed bytes.

A request body is timed twice: each wait for its next piece is bounded by the body timeout, and
the whole body must arrive by a deadline of the body timeout plus its size at
:data:`MIN_BODY_RATE` (so a sender that trickles a byte just inside each wait cannot hold a
request, and a slot of the concurrency cap, for ever). A sender that misses either gets a 408
from here, with ``Connection: close``, and the application sees the client disconnect. The
header-read timeout belongs to the server's protocol (``server.py``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import MedinferError, PayloadTooLargeError, RequestTimeoutError
from app.observability.logging import request_id_var, trace_id_var
from app.observability.metrics import Metrics
from app.observability.tracing import scrub_current_span
from app.transport.http.problems import PROBLEM_MEDIA_TYPE, problem_bytes, status_for

log = logging.getLogger("app.access")

REQUEST_ID_HEADER: Final = b"x-request-id"
#: Bytes per second a request body must average, on top of the body timeout's allowance: a
#: 64 MiB upload may take 30 s + 1024 s. Slower than any link a hospital client sends over
#: (about 0.5 Mbit/s), fast enough that a trickle cannot hold a request.
MIN_BODY_RATE: Final = 64 * 1024
ADMIN_PREFIX: Final = "/v1/admin/"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
#: W3C Trace Context: version-traceid-parentid-flags; an all-zero trace id is invalid.
_TRACEPARENT = re.compile(rb"^[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def body_deadline(started: float, timeout_s: float, size: int, min_rate: float = MIN_BODY_RATE) -> float:
    """When a body of ``size`` bytes whose reading began at ``started`` must have arrived."""
    return started + timeout_s + size / min_rate


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


class RequestContextMiddleware:
    """Per request: bind a request id, cap and time the body, then log and count the outcome."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_body_bytes: int,
        max_admin_body_bytes: int,
        body_timeout_s: float,
        min_body_rate: float = MIN_BODY_RATE,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_admin_body_bytes = max_admin_body_bytes
        self.body_timeout_s = body_timeout_s
        self.min_body_rate = min_body_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = _header(scope, REQUEST_ID_HEADER)
        # A caller-chosen id is echoed only if it is short and plain; otherwise we mint one,
        # so a header can never smuggle PHI or control characters into our logs.
        request_id = presented.decode() if presented and _VALID_REQUEST_ID.match(presented) else str(uuid.uuid4())
        token = request_id_var.set(request_id)
        traceparent = _TRACEPARENT.match(_header(scope, b"traceparent") or b"")
        trace_token = trace_id_var.set(traceparent.group(1).decode() if traceparent else None)
        started = time.perf_counter()
        status = 500
        response_started = False
        #: Set once this middleware has answered in the app's stead; the app's own sends are dropped.
        answered = False
        limit = (
            self.max_admin_body_bytes if str(scope.get("path", "")).startswith(ADMIN_PREFIX) else self.max_body_bytes
        )

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if answered:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                # Routing is done by now and the server span (if tracing is on) is still open.
                scrub_current_span(getattr(scope.get("route"), "path", None) or "<unmatched>")
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        declared = _header(scope, b"content-length")
        declared_size = int(declared) if declared is not None and declared.isdigit() else None
        body_receive = self._bounded(receive, limit, declared_size)

        async def receive_or_time_out() -> Message:
            nonlocal answered
            try:
                return await body_receive()
            except RequestTimeoutError as exc:
                if not response_started:
                    await self._refuse(send_with_id, exc)
                answered = True
                log.warning("request body stalled or too slow", extra={"event": "http.body_timeout"})
                # What the app sees is what happens next: the connection closes.
                return {"type": "http.disconnect"}

        try:
            if declared is not None and (declared_size is None or declared_size > limit):
                await self._refuse(send_with_id, PayloadTooLargeError(f"request body exceeds the {limit}-byte limit"))
                return
            try:
                await self.app(scope, receive_or_time_out, send_with_id)
            except Exception:
                if not answered:
                    raise
                # The app failed on the disconnect it was handed after our 408: nothing to add.
        finally:
            self._record(scope, status, time.perf_counter() - started)
            request_id_var.reset(token)
            trace_id_var.reset(trace_token)

    def _record(self, scope: Scope, status: int, elapsed: float) -> None:
        template = getattr(scope.get("route"), "path", None) or "<unmatched>"
        method = scope.get("method", "")
        self.metrics.http_requests.labels(route=template, method=method, status=str(status)).inc()
        self.metrics.http_duration.labels(route=template, method=method).observe(elapsed)
        log.info(
            "request",
            extra={
                "event": "http.request",
                "method": method,
                "route": template,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )

    def _bounded(self, receive: Receive, limit: int, declared: int | None) -> Receive:
        """``receive`` with the body bounded in time and its bytes counted.

        The clock starts at the first ``receive`` (the application may authenticate first). Each
        wait ends at the body timeout or the body's deadline (:func:`body_deadline`), whichever
        comes first; the deadline is reckoned on the bytes received so far (never on the declared
        Content-Length, which would give a trickling sender its whole allowance up front). Once
        the body is complete, a further
        ``receive`` (waiting for the disconnect, as a streaming response does) is not bounded:
        there is nothing left to time.
        """
        seen = 0
        complete = False
        timeout_s = self.body_timeout_s
        min_rate = self.min_body_rate
        started: float | None = None

        async def bounded_receive() -> Message:
            nonlocal seen, complete, started
            if complete:
                return await receive()
            now = asyncio.get_running_loop().time()
            if started is None:
                started = now
            # Earned by what has arrived, never by what is declared: a sender that declares 64 MiB
            # and trickles would otherwise get its whole allowance (about 17 minutes) up front.
            deadline = body_deadline(started, timeout_s, seen, min_rate)
            try:
                async with asyncio.timeout_at(min(now + timeout_s, deadline)):
                    message = await receive()
            except TimeoutError:
                if now + timeout_s <= deadline:
                    raise RequestTimeoutError(f"no request body bytes arrived for {timeout_s:g} s") from None
                raise RequestTimeoutError("the request body did not arrive in time") from None
            if message["type"] != "http.request":
                complete = True
                return message
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLargeError(f"request body exceeds the {limit}-byte limit")
            complete = not message.get("more_body", False)
            return message

        return bounded_receive

    async def _refuse(self, send: Send, error: MedinferError) -> None:
        """Answer ``error`` before (or instead of) the app, and close: the rest of the body is unread."""
        body = problem_bytes(error)
        await send(
            {
                "type": "http.response.start",
                "status": status_for(type(error)),
                "headers": [
                    (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
