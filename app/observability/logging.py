"""Structured JSON logs with a request id, and a redaction rule that keeps PHI out.

Only keys on an allow-list leave a record. Message strings are fixed by the code; values that
could carry patient data (names, IDs, UIDs, free text from payloads) are never passed to a
logger, and if one slips into ``extra`` under an unknown key it is dropped, not printed.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, Final

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
#: W3C Trace Context trace id of the current request (from ``traceparent``), for log correlation.
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

#: ``extra`` keys that may appear in a log record. Anything else is dropped.
ALLOWED_EXTRA: Final = frozenset(
    {
        "event",
        # audit.checkpoint: the signed head, the second copy outside the database (no PHI)
        "seq",
        "hash",
        "signature",
        "key_id",
        "replica",
        "signed_seq",
        "head_seq",
        "code",
        "status",
        "method",
        "route",
        "duration_ms",
        "model",
        "version",
        "providers",
        "missing",
        "error_kind",
        "client_id",
        "host",
        "port",
        "count",
        "reason",
        "exc_type",
    }
)

#: Loggers whose messages are fixed strings written by us (or by the ASGI server). Other
#: libraries (pydicom, pynetdicom, highdicom, warnings) may quote element values, that is patient
#: data, in their messages: those records keep their logger and level, but not their text.
TRUSTED_MESSAGE_LOGGERS: Final = ("app", "uvicorn", "alembic")
WITHHELD: Final = "(message withheld: third-party text may quote payload content)"

_RESERVED: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


class WithholdUntrustedText(logging.Filter):
    """Replaces the message of records from loggers outside :data:`TRUSTED_MESSAGE_LOGGERS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] not in TRUSTED_MESSAGE_LOGGERS:
            record.msg, record.args = WITHHELD, None
            record.exc_text = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and allowed extras."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        request_id = request_id_var.get()
        if request_id is not None:
            payload["request_id"] = request_id
        trace_id = trace_id_var.get()
        if trace_id is not None:
            payload["trace_id"] = trace_id
        for key, value in vars(record).items():
            if key in _RESERVED or key.startswith("_"):
                continue
            if key in ALLOWED_EXTRA:
                payload[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception messages from libraries may quote payload content.
            payload["exc_type"] = record.exc_info[0].__name__
        return json.dumps(payload, default=str, separators=(",", ":"))


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Install the JSON handler on the root logger (idempotent). Called by the CLI, not on import."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_medinfer", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(levelname)s %(name)s %(message)s"))
    handler.addFilter(WithholdUntrustedText())
    handler._medinfer = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Library warnings (pydicom's quote element values) go through the formatter, not to stderr.
    logging.captureWarnings(capture=True)
    # uvicorn's access log prints raw paths and query strings, which may carry identifiers; our
    # middleware logs route templates instead.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
