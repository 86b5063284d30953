"""The PACS outbox: DICOM SR results wait in the database until the destination has them.

An SR is sealed (AES-256-GCM, bound to its SOP Instance UID) into its row, and the row committed,
before anything is sent: a restart loses no result, and any replica can deliver any row. A
sender claims a row by a conditional UPDATE (``pending`` -> ``sending`` with a lease), so two
workers or replicas never send the same row at once; success marks it ``delivered``, drops the
sealed copy, and it is never picked again. A failure schedules a retry with exponential backoff
(doubling from ``MEDINFER_PACS_RETRY_BASE_S`` up to five minutes) until
``MEDINFER_PACS_MAX_ATTEMPTS``, then ``failed``. A crash between the destination's success and
our commit leaves a lease that expires and a resend of the *same* SOP Instance UID, which a PACS
stores once.

Results the worker gave up on (``failed``) or kept for want of a destination (``held``) are sent
only when an operator says so (``medinfer outbox requeue``). The backlog gauges count every
undelivered result, so neither state goes unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.domain import AuditRecord
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
#: The audit action of one delivery attempt to the PACS.
DELIVERY_ACTION: Final = "pacs.delivery"


class Sender(Protocol):
    """Delivers one Part 10 object; raises :class:`DeliveryError`. Blocking (runs in a thread)."""

    @property
    def destination(self) -> str: ...

    def send(self, encoded: bytes) -> None: ...


#: States of a result that has not reached the PACS; all but ``failed`` are still waiting.
WAITING: Final = (PENDING, SENDING, HELD)
#: States an operator may send again (``medinfer outbox requeue``).
REQUEUABLE: Final = (HELD, FAILED)
#: How often the backlog gauges are recounted when nothing changed in between.
BACKLOG_REFRESH_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Backlog:
    """Undelivered results in the shared database (every replica's)."""

    by_state: dict[str, int]
    oldest_waiting: datetime | None


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
        audit: Callable[[AuditRecord], Awaitable[object]] | None = None,
    ) -> None:
        """Without a sender, results are kept (state ``held``): once a destination is configured, an
        operator releases them with ``medinfer outbox requeue --state held``.

        ``audit`` (the pipeline's ``record``) receives a ``pacs.delivery`` event after every
        attempt, delivered or failed, with the destination and the attempt count.
        """
        self._audit = audit
        self._sessionmaker = sessionmaker
        self._files = files
        self._sender = sender
        self._metrics = metrics
        self._retry_base_s = retry_base_s
        self._max_attempts = max_attempts
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._backlog_stale = True
        self._closed = False

    @property
    def destination(self) -> str:
        return self._sender.destination if self._sender is not None else "none"

    async def enqueue(self, sop_instance_uid: str, encoded: bytes) -> None:
        """Seal the object into its row and commit it, before anything is sent."""
        sealed = await asyncio.to_thread(self._files.seal, sop_instance_uid, encoded)
        now = self._clock()
        async with self._sessionmaker() as db:
            db.add(
                PacsOutbox(
                    created_at=now,
                    destination=self.destination[:128],
                    sop_instance_uid=sop_instance_uid,
                    payload=sealed,
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
        self._backlog_stale = True
        self._wakeup.set()

    async def run(self, poll_s: float = 1.0) -> None:
        """Deliver due rows and keep the backlog gauges current until cancelled.

        A database outage only delays delivery. Without a sender nothing is delivered, but the
        gauges still show the held results, so a missing destination is visible.
        """
        counted_at = -BACKLOG_REFRESH_S
        while not self._closed:
            try:
                await self.deliver_due()
                if self._backlog_stale or time.monotonic() - counted_at >= BACKLOG_REFRESH_S:
                    self._backlog_stale = False
                    self._publish(await count_backlog(self._sessionmaker))
                    counted_at = time.monotonic()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("outbox pass failed", extra={"event": "outbox.pass_failed", "error": type(exc).__name__})
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one pass, or results stop
                log.error(  # noqa: TRY400 - a traceback could quote row contents; the class is enough
                    "outbox pass failed unexpectedly",
                    extra={"event": "outbox.pass_error", "error": type(exc).__name__},
                )
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wakeup.wait(), timeout=poll_s if self._sender is not None else BACKLOG_REFRESH_S
                )

    def close(self) -> None:
        """End :meth:`run` after its current pass.

        Cancelling alone is not enough on Python 3.11: ``asyncio.wait_for`` drops a cancellation
        that arrives as the event it waits on is set (an SR just queued), and the loop would go on.
        """
        self._closed = True
        self._wakeup.set()

    async def deliver_due(self, limit: int = 16) -> int:
        """One pass: claim and send the rows that are due. Returns how many were delivered."""
        if self._sender is None:
            return 0
        delivered = 0
        now = self._clock()
        async with self._sessionmaker() as db:
            rows = (
                await db.execute(
                    select(PacsOutbox.id, PacsOutbox.sop_instance_uid, PacsOutbox.payload_path, PacsOutbox.attempts)
                    .where(PacsOutbox.state.in_((PENDING, SENDING)), PacsOutbox.next_attempt_at <= now)
                    .order_by(PacsOutbox.id)
                    .limit(limit)
                )
            ).all()
        for row_id, sop_uid, legacy_name, attempts in rows:
            legacy = self._files.directory / legacy_name if legacy_name else None
            if legacy is not None and not legacy.exists():
                continue  # a row from before revision 0004: the replica holding its file delivers it
            if not await self._claim(row_id):
                continue
            try:
                encoded = await self._load(row_id, sop_uid, legacy)
                await asyncio.to_thread(self._sender.send, encoded)
            except (MedinferError, SealedFileError, OSError) as exc:
                gave_up = await self._failed(row_id, attempts + 1, exc)
                await self._audit_delivery(sop_uid, attempts + 1, exc, gave_up=gave_up)
                continue
            await self._delivered(row_id)
            await self._audit_delivery(sop_uid, attempts + 1, None, gave_up=False)
            if legacy is not None:
                self._files.remove(legacy)
            delivered += 1
        return delivered

    async def _load(self, row_id: int, sop_uid: str, legacy: Path | None) -> bytes:
        if legacy is not None:
            return await asyncio.to_thread(self._files.read, legacy)
        async with self._sessionmaker() as db:
            sealed = (await db.execute(select(PacsOutbox.payload).where(PacsOutbox.id == row_id))).scalar_one()
        if sealed is None:
            msg = "the outbox row holds no result"
            raise SealedFileError(msg)
        return await asyncio.to_thread(self._files.unseal, sop_uid, sealed)

    def _publish(self, backlog: Backlog) -> None:
        for state, count in backlog.by_state.items():
            self._metrics.outbox_backlog.labels(state=state).set(count)
        age = 0.0 if backlog.oldest_waiting is None else (self._clock() - backlog.oldest_waiting).total_seconds()
        self._metrics.outbox_oldest_age.set(max(age, 0.0))

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
                # Delivered: the PACS has it, so the sealed copy (PHI) is not kept.
                .values(state=DELIVERED, delivered_at=self._clock(), last_error=None, payload=None)
            )
            await db.commit()
        self._backlog_stale = True
        self._metrics.outbox_events.labels(outcome="delivered").inc()
        log.info("result delivered", extra={"event": "outbox.delivered"})

    async def _audit_delivery(self, sop_uid: str, attempts: int, error: BaseException | None, *, gave_up: bool) -> None:
        """One ``pacs.delivery`` event per attempt. The result already left (or did not): a
        trail that cannot take the event is logged and counted by the writer, and delivery goes on.
        """
        if self._audit is None:
            return
        detail: dict[str, object] = {"destination": public_destination(self.destination), "attempts": attempts}
        if error is not None:
            detail["code"] = error.code if isinstance(error, MedinferError) else "io-error"
            detail["gave_up"] = gave_up
        try:
            await self._audit(
                AuditRecord(
                    action=DELIVERY_ACTION,
                    outcome="failure" if error is not None else "success",
                    actor="outbox",
                    sop_uids=(sop_uid,),
                    detail=detail,
                )
            )
        except MedinferError as exc:
            log.warning("delivery not audited", extra={"event": "outbox.delivery_unaudited", "code": exc.code})

    async def _failed(self, row_id: int, attempts: int, error: BaseException) -> bool:
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
        self._backlog_stale = True
        self._metrics.outbox_events.labels(outcome="failed" if gave_up else "retry").inc()
        log.warning(
            "result delivery failed",
            extra={"event": "outbox.retry", "attempts": attempts, "gave_up": gave_up, "error": type(error).__name__},
        )
        return gave_up


def public_destination(destination: str) -> str:
    """The destination as the audit trail keeps it: scheme, host and port (and the called AE
    title of a DIMSE peer), never a password or query a DICOMweb URL might carry."""
    parts = urlsplit(destination)
    if not parts.scheme or parts.hostname is None:
        return destination if destination == "none" else "unparsed"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = f":{parts.port}" if parts.port is not None else ""
    user = f"{parts.username}@" if parts.scheme == "dimse" and parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path if parts.scheme != 'dimse' else ''}"


async def count_backlog(sessionmaker: async_sessionmaker[AsyncSession]) -> Backlog:
    """Count what has not been delivered; the ``state`` index keeps delivered rows out of it."""
    async with sessionmaker() as db:
        rows = (
            await db.execute(
                select(PacsOutbox.state, func.count(), func.min(PacsOutbox.created_at))
                .where(PacsOutbox.state.in_((*WAITING, FAILED)))
                .group_by(PacsOutbox.state)
            )
        ).all()
    by_state = dict.fromkeys((*WAITING, FAILED), 0)
    oldest: datetime | None = None
    for state, count, created_at in rows:
        by_state[state] = count
        if state in WAITING and created_at is not None:
            # SQLite hands back naive datetimes; they were written in UTC.
            aware = created_at if created_at.tzinfo is not None else created_at.replace(tzinfo=UTC)
            oldest = aware if oldest is None else min(oldest, aware)
    return Backlog(by_state=by_state, oldest_waiting=oldest)


async def requeue(sessionmaker: async_sessionmaker[AsyncSession], states: Sequence[str], now: datetime) -> int:
    """Make ``held`` or ``failed`` results due again, with a fresh set of attempts (operator action)."""
    unknown = set(states) - set(REQUEUABLE)
    if unknown:
        msg = f"only {', '.join(REQUEUABLE)} results can be requeued"
        raise ValueError(msg)
    async with sessionmaker() as db:
        result = await db.execute(
            update(PacsOutbox)
            .where(PacsOutbox.state.in_(tuple(states)))
            .values(state=PENDING, attempts=0, next_attempt_at=now, last_error=None)
        )
        await db.commit()
    return int(getattr(result, "rowcount", 0))
