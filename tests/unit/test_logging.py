from __future__ import annotations

import json
import logging

from app.observability.logging import JsonFormatter, request_id_var


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("app.test", logging.INFO, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_log_lines_are_json_with_the_request_id() -> None:
    token = request_id_var.set("req-123")
    try:
        line = JsonFormatter().format(_record("request", event="http.request", status=200))
    finally:
        request_id_var.reset(token)
    payload = json.loads(line)
    assert payload["request_id"] == "req-123"
    assert payload["event"] == "http.request"
    assert payload["status"] == 200
    assert payload["level"] == "info"


def test_unknown_extra_keys_are_dropped_so_phi_cannot_slip_through() -> None:
    line = JsonFormatter().format(_record("x", patient_name="DOE^JANE", patient_id="MRN-0042", model="alpha"))
    assert "DOE^JANE" not in line
    assert "MRN-0042" not in line
    assert json.loads(line)["model"] == "alpha"


def test_exceptions_are_logged_by_type_without_their_message() -> None:
    try:
        raise ValueError("PatientName=DOE^JANE")  # noqa: TRY301 - the message is what we test
    except ValueError:
        record = _record("failed")
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert json.loads(line)["exc_type"] == "ValueError"
    assert "DOE^JANE" not in line
