"""Anonymous authentication failures become one audit event per reason per interval, with a count."""

from __future__ import annotations

import asyncio

from app.domain import AuditRecord
from app.errors import AuditUnavailableError
from app.security.failures import MAX_REASONS, MAX_SOURCES, OTHER_REASON, AuthFailureLog


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Trail:
    """Where the log writes: a list, or an unavailable trail when ``down``."""

    def __init__(self) -> None:
        self.events: list[AuditRecord] = []
        self.down = False

    async def record(self, event: AuditRecord) -> None:
        if self.down:
            raise AuditUnavailableError("audit trail unavailable", retry_after_s=2)
        self.events.append(event)


def _run(failures: AuthFailureLog, *, final: bool = False) -> int:
    return asyncio.run(failures.run_once(final=final))


def test_a_flood_in_one_interval_is_one_event_per_reason_with_its_count() -> None:
    clock, trail = Clock(6_000.0), Trail()
    failures = AuthFailureLog(trail.record, 60.0, clock=clock)
    for i in range(200):
        failures.note("unknown or revoked API key", f"192.0.2.{i % 3}")
    for _ in range(5):
        failures.note("missing Authorization header", "198.51.100.7")
    clock.now = 6_059.9
    assert _run(failures) == 0  # the window is still open
    clock.now = 6_060.0
    assert _run(failures) == 2
    assert _run(failures) == 0  # written once
    missing, unknown = trail.events
    assert {e.action for e in trail.events} == {"auth.failure"}
    assert {e.outcome for e in trail.events} == {"failure"}
    assert unknown.detail["reason"] == "unknown or revoked API key"
    assert unknown.detail["count"] == 200
    assert unknown.detail["distinct_sources"] == 3
    assert unknown.source_ip is None  # several sources: none is named
    assert missing.detail["count"] == 5
    assert missing.source_ip == "198.51.100.7"
    assert unknown.detail["window_start"] == "1970-01-01T01:40:00+00:00"
    assert unknown.actor is None
    assert unknown.request_id is None


def test_each_interval_gets_its_own_event() -> None:
    clock, trail = Clock(0.0), Trail()
    failures = AuthFailureLog(trail.record, 10.0, clock=clock)
    failures.note("missing Authorization header", None)
    clock.now = 15.0
    failures.note("missing Authorization header", None)
    failures.note("missing Authorization header", None)
    assert _run(failures) == 1
    clock.now = 20.0
    assert _run(failures) == 1
    assert [e.detail["count"] for e in trail.events] == [1, 2]


def test_shutdown_writes_the_open_interval() -> None:
    clock, trail = Clock(100.0), Trail()
    failures = AuthFailureLog(trail.record, 3600.0, clock=clock)
    for _ in range(7):
        failures.note("Authorization must use the Bearer scheme", "203.0.113.9")
    asyncio.run(failures.aclose())
    (event,) = trail.events
    assert event.detail["count"] == 7
    assert failures.pending() == 0


def test_counts_wait_for_an_unavailable_trail_and_are_written_once_it_returns() -> None:
    clock, trail = Clock(0.0), Trail()
    failures = AuthFailureLog(trail.record, 1.0, clock=clock)
    for _ in range(3):
        failures.note("unknown or revoked API key", None)
    clock.now = 1.5
    trail.down = True
    assert _run(failures) == 0
    assert failures.pending() == 3
    trail.down = False
    assert _run(failures) == 1
    assert [e.detail["count"] for e in trail.events] == [3]
    assert failures.pending() == 0


def test_memory_is_bounded_by_reasons_and_sources() -> None:
    clock, trail = Clock(0.0), Trail()
    failures = AuthFailureLog(trail.record, 60.0, clock=clock)
    for i in range(MAX_REASONS + 10):
        failures.note(f"reason {i}", None)
    for i in range(MAX_SOURCES + 50):
        failures.note("reason 0", f"10.0.{i // 256}.{i % 256}")
    _run(failures, final=True)
    reasons = {e.detail["reason"]: e for e in trail.events}
    assert len(reasons) == MAX_REASONS
    assert reasons[OTHER_REASON].detail["count"] == 11
    assert reasons["reason 0"].detail["count"] == MAX_SOURCES + 51
    assert reasons["reason 0"].detail["distinct_sources"] == MAX_SOURCES
    assert reasons["reason 0"].detail["distinct_sources_capped"] is True
    assert sum(int(str(e.detail["count"])) for e in trail.events) == MAX_REASONS + 10 + MAX_SOURCES + 50
