"""The PACS outbox: DICOM SR results wait in the database until the destination has them.

An SR is sealed to disk and its row committed before anything is sent, so a restart loses no
result. A sender claims a row by a conditional UPDATE (``pending`` -> ``sending`` with a lease),
so two workers or replicas never send the same row at once; success marks it ``delivered``
and it is never picked again. A failure schedules a retry with exponential backoff (doubling
from ``MEDINFER_PACS_RETRY_BASE_S`` up to five minutes) until ``MEDINFER_PACS_MAX_ATTEMPTS``,
then ``failed``. A crash between the destination's success and our commit leaves a lease that
expires and a resend of the *same* SOP Instance UID, which a PACS stores once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.errors import DeliveryError, MedinferError
from app.observability.metrics import Metrics
from app.security.sealed import SealedFileError, SealedFiles
from app.tables import PacsOutbox

log = logging.getLogger(__name__)

MAX_BACKOFF_S: Final = 300.0
LEASE_S: Final = 120.0
PENDING: Final = "pending"
SENDING: Final = "sending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
HELD: Final = "held"
_SUFFIX: Final = ".sr"


class Sender(Protocol):
    """Delivers one Part 10 object; raises :class:`DeliveryError`. Blocking (runs in a thread)."""

    @property
    def destination(self) -> str: ...

    def send(self, encoded: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    pending: int
    delivered: int
    failed: int


def _now() -> datetime:
    return datetime.now(UTC)


class Outbox:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        files: SealedFiles,
        sender: Sender | None,
        metrics: Metrics,
        *,
        retry_base_s: float,
        max_attempts: int,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        """Without a sender, results are kept (state ``held``) until one is configured."""
        self._sessionmaker = sessionmaker
        self._files = files
        self._sender = sender
        self._metrics = metrics
        self._retry_base_s = retry_base_s
        self._max_attempts = max_attempts
        self._clock = clock
        self._wakeup = asyncio.Event()

    @property
    def destination(self) -> str:
        return self._sender.destination if self._sender is not None else "none"

    async def enqueue(self, sop_instance_uid: str, encoded: bytes) -> None:
        """Seal the object to disk and commit its row; both before anything is sent."""
        # File names carry no identifier: a digest of the SOP Instance UID.
        name = hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:40] + _SUFFIX
        path = await asyncio.to_thread(self._files.write, name, encoded)
        now = self._clock()
        async with self._sessionmaker() as db:
            db.add(
                PacsOutbox(
                    created_at=now,
                    destination=self.destination[:128],
                    sop_instance_uid=sop_instance_uid,
                    payload_path=path.name,
                    state=PENDING if self._sender is not None else HELD,
                    attempts=0,
                    next_attempt_at=now,
                )
            )
            try:
                await db.commit()
            except IntegrityError:
                # The same SR (same SOP Instance UID) is already queued: keep the first.
                await db.rollback()
                log.info("result already in the outbox", extra={"event": "outbox.duplicate"})
                return
        self._metrics.outbox_events.labels(outcome="queued").inc()
        self._wakeup.set()

    async def run(self, poll_s: float = 1.0) -> None:
        """Deliver due rows until cancelled; a database outage only delays delivery."""
        if self._sender is None:
            return
        while True:
            try:
                await self.deliver_due()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("outbox pass failed", extra={"event": "outbox.pass_failed", "error": type(exc).__name__})
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=poll_s)

    async def deliver_due(self, limit: int = 16) -> int:
        """One pass: claim and send the rows that are due. Returns how many were delivered."""
        if self._sender is None:
            return 0
        delivered = 0
        now = self._clock()
        async with self._sessionmaker() as db:
            rows = (
                await db.execute(
                    select(PacsOutbox.id, PacsOutbox.payload_path, PacsOutbox.attempts)
                    .where(PacsOutbox.state.in_((PENDING, SENDING)), PacsOutbox.next_attempt_at <= now)
                    .order_by(PacsOutbox.id)
                    .limit(limit)
                )
            ).all()
        for row_id, name, attempts in rows:
            path = self._files.directory / name
            if not path.exists():
                continue  # another replica's file: it delivers its own rows
            if not await self._claim(row_id):
                continue
            try:
                encoded = await asyncio.to_thread(self._files.read, path)
                await asyncio.to_thread(self._sender.send, encoded)
            except (MedinferError, SealedFileError, OSError) as exc:
                await self._failed(row_id, attempts + 1, exc)
                continue
            await self._delivered(row_id)
            self._files.remove(path)
            delivered += 1
        return delivered

    async def counts(self) -> OutboxCounts:
        async with self._sessionmaker() as db:
            result = dict(
                (await db.execute(select(PacsOutbox.state, func.count()).group_by(PacsOutbox.state))).tuples().all()
            )
        return OutboxCounts(
            pending=result.get(PENDING, 0) + result.get(SENDING, 0) + result.get(HELD, 0),
            delivered=result.get(DELIVERED, 0),
            failed=result.get(FAILED, 0),
        )

    async def _claim(self, row_id: int) -> bool:
        now = self._clock()
        async with self._sessionmaker() as db:
            result = await db.execute(
                update(PacsOutbox)
                .where(
                    PacsOutbox.id == row_id,
                    PacsOutbox.state.in_((PENDING, SENDING)),
                    PacsOutbox.next_attempt_at <= now,
                )
                .values(state=SENDING, next_attempt_at=now + timedelta(seconds=LEASE_S))
            )
            await db.commit()
            return bool(getattr(result, "rowcount", 0) == 1)

    async def _delivered(self, row_id: int) -> None:
        async with self._sessionmaker() as db:
            await db.execute(
                update(PacsOutbox)
                .where(PacsOutbox.id == row_id)
                .values(state=DELIVERED, delivered_at=self._clock(), last_error=None)
            )
            await db.commit()
        self._metrics.outbox_events.labels(outcome="delivered").inc()
        log.info("result delivered", extra={"event": "outbox.delivered"})

    async def _failed(self, row_id: int, attempts: int, error: BaseException) -> None:
        gave_up = attempts >= self._max_attempts
        delay = min(self._retry_base_s * 2 ** (attempts - 1), MAX_BACKOFF_S)
        reason = error.detail if isinstance(error, DeliveryError) else type(error).__name__
        async with self._sessionmaker() as db:
            await db.execute(
                update(PacsOutbox)
                .where(PacsOutbox.id == row_id)
                .values(
                    state=FAILED if gave_up else PENDING,
                    attempts=attempts,
                    next_attempt_at=self._clock() + timedelta(seconds=delay),
                    last_error=reason[:256],
                )
            )
            await db.commit()
        self._metrics.outbox_events.labels(outcome="failed" if gave_up else "retry").inc()
        log.warning(
            "result delivery failed",
            extra={"event": "outbox.retry", "attempts": attempts, "gave_up": gave_up, "error": type(error).__name__},
        )
