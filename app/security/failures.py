"""Anonymous authentication failures, audited as counts per reason per interval.

A request that presents no valid credential has no actor: one audit row each would let anyone
grow the permanent, hash-chained trail without bound just by knocking. So failures are tallied
by reason in epoch-aligned windows of ``interval_s``, and each closed window becomes one
``auth.failure`` event per reason carrying the count and the number of distinct source
addresses (never the presented credential). The Prometheus counter still counts every failure.

Memory is bounded whatever the flood: a fixed number of reasons per window (the rest are
tallied as ``other``), a fixed number of remembered source addresses per reason (beyond it the
count of sources is a lower bound), and a fixed number of events waiting for the audit trail
while it is unavailable (the oldest are dropped, and the log says how many failures they held).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from app.domain import AuditRecord
from app.errors import AuditUnavailableError

log = logging.getLogger(__name__)

ACTION: Final = "auth.failure"
MAX_REASONS: Final = 16
MAX_SOURCES: Final = 1024
MAX_UNSENT: Final = 10_000
OTHER_REASON: Final = "other"


@dataclass(slots=True)
class _Tally:
    count: int = 0
    sources: set[str] = field(default_factory=set)
    sources_capped: bool = False

    def add(self, source_ip: str | None) -> None:
        self.count += 1
        if source_ip is None or source_ip in self.sources:
            return
        if len(self.sources) < MAX_SOURCES:
            self.sources.add(source_ip)
        else:
            self.sources_capped = True


class AuthFailureLog:
    """Tallies anonymous authentication failures and writes one audit event per reason per window.

    ``note`` is cheap and synchronous (called on every 401). ``run_once`` writes the windows that
    have ended by ``clock()``; ``start`` runs it periodically; ``aclose`` writes everything left,
    the open window included, and must run before the audit writer closes.
    """

    def __init__(
        self,
        sink: Callable[[AuditRecord], Awaitable[object]],
        interval_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self._sink = sink
        self._interval_s = interval_s
        self._clock = clock
        self._windows: dict[float, dict[str, _Tally]] = {}
        self._unsent: deque[tuple[AuditRecord, int]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def _window_of(self, now: float) -> float:
        return math.floor(now / self._interval_s) * self._interval_s

    def note(self, reason: str, source_ip: str | None) -> None:
        """Count one failure of ``reason`` (a fixed message of ours, never caller text)."""
        tallies = self._windows.setdefault(self._window_of(self._clock()), {})
        if reason not in tallies and len(tallies) >= MAX_REASONS - 1:
            reason = OTHER_REASON
        tallies.setdefault(reason, _Tally()).add(source_ip)

    def pending(self) -> int:
        """Failures counted but not yet in the audit trail."""
        counted = sum(t.count for tallies in self._windows.values() for t in tallies.values())
        return counted + sum(count for _, count in self._unsent)

    def _close_windows(self, now: float) -> None:
        for start in sorted(self._windows):
            if start + self._interval_s > now:
                continue
            for reason, tally in sorted(self._windows.pop(start).items()):
                self._unsent.append((self._event(start, reason, tally), tally.count))
        dropped = 0
        while len(self._unsent) > MAX_UNSENT:
            dropped += self._unsent.popleft()[1]
        if dropped:
            log.warning(
                "anonymous authentication failures dropped from the audit backlog",
                extra={"event": "auth.failure_backlog_dropped", "count": dropped},
            )

    def _event(self, start: float, reason: str, tally: _Tally) -> AuditRecord:
        single = next(iter(tally.sources)) if len(tally.sources) == 1 and not tally.sources_capped else None
        return AuditRecord(
            action=ACTION,
            outcome="failure",
            source_ip=single,
            detail={
                "reason": reason,
                "count": tally.count,
                "distinct_sources": len(tally.sources),
                "distinct_sources_capped": tally.sources_capped,
                "window_start": datetime.fromtimestamp(start, UTC).isoformat(),
                "window_s": self._interval_s,
            },
        )

    async def run_once(self, *, final: bool = False) -> int:
        """Write the events of every window ended by now (all windows when ``final``); returns
        how many events were written. If the audit trail is unavailable they wait for the next
        run, so a window is written once, late rather than never."""
        async with self._flushing:
            self._close_windows(math.inf if final else self._clock())
            written = 0
            while self._unsent:
                try:
                    await self._sink(self._unsent[0][0])
                except AuditUnavailableError:
                    log.warning(
                        "anonymous authentication failures not yet audited",
                        extra={"event": "auth.failure_audit_deferred", "count": self.pending()},
                    )
                    break
                self._unsent.popleft()
                written += 1
            return written

    def start(self) -> None:
        """Write each window soon after it ends (within a second, or the interval if shorter)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="auth-failure-log")

    async def _run(self) -> None:
        tick_s = min(1.0, self._interval_s)
        while True:
            await asyncio.sleep(tick_s)
            await self.run_once()

    async def aclose(self) -> None:
        """Stop the periodic task and write every tally, the open window's too (at shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.run_once(final=True)
        if self._unsent:
            log.warning(
                "anonymous authentication failures could not be audited at shutdown",
                extra={"event": "auth.failure_audit_lost", "count": self.pending()},
            )
