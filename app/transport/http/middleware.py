"""Pure ASGI middleware: request ids, body-size cap, access log and HTTP metrics.

Pure ASGI (not ``BaseHTTPMiddleware``) so that streaming bodies are not buffered and the cap is
enforced as bytes arrive, before the application reads the whole body.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLargeError
from app.observability.logging import request_id_var, trace_id_var
from app.observability.metrics import Metrics
from app.observability.tracing import scrub_current_span
from app.transport.http.problems import PROBLEM_MEDIA_TYPE, problem_bytes, status_for

log = logging.getLogger("app.access")

REQUEST_ID_HEADER: Final = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
#: W3C Trace Context: version-traceid-parentid-flags; an all-zero trace id is invalid.
_TRACEPARENT = re.compile(rb"^[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


class RequestContextMiddleware:
    """Per request: bind a request id, cap the body, then log and count the outcome."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

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

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Routing is done by now and the server span (if tracing is on) is still open.
                scrub_current_span(getattr(scope.get("route"), "path", None) or "<unmatched>")
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            declared = _header(scope, b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
                await self._too_large(send_with_id)
                return
            await self.app(scope, self._capped(receive), send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            elapsed = time.perf_counter() - started
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
            request_id_var.reset(token)
            trace_id_var.reset(trace_token)

    def _capped(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLargeError(f"request body exceeds the {limit}-byte limit")
            return message

        return capped_receive

    async def _too_large(self, send: Send) -> None:
        error = PayloadTooLargeError(f"request body exceeds the {self.max_body_bytes}-byte limit")
        body = problem_bytes(error)
        await send(
            {
                "type": "http.response.start",
                "status": status_for(PayloadTooLargeError),
                "headers": [
                    (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
