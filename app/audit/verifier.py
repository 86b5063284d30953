"""Verifying the whole trail in bounded memory, off the event loop.

The chain is read a page at a time by keyset (``seq > last ORDER BY seq LIMIT page``) on a
synchronous connection in a worker thread, and each row is hashed and dropped before the next
page is fetched: memory does not grow with the chain, and the event loop (``/livez``, requests)
keeps running while 200,000 events are hashed. One verification runs at a time per process;
further callers wait for it rather than multiply the load, and a caller that gives up (a
cancelled request) does not free the turn: the walk it started runs on in its thread, and the
next one starts only when that has finished.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, select

from app.audit.chain import CHAINED, Verification, verify
from app.audit.checkpoint import read_anchor
from app.tables import AuditEvent, AuditHead

PAGE = 2000
_COLUMNS = tuple(getattr(AuditEvent, name) for name in (*CHAINED, "prev_hash", "hash", "mac"))


def _pages(conn: Connection, upto: int, page: int) -> Iterator[Any]:
    last = 0
    while True:
        query = select(*_COLUMNS).where(AuditEvent.seq > last, AuditEvent.seq <= upto).order_by(AuditEvent.seq)
        rows = conn.execute(query.limit(page)).all()
        conn.rollback()  # no snapshot held between pages (SQLite's WAL may checkpoint meanwhile)
        if not rows:
            return
        yield from rows
        last = rows[-1].seq
        del rows


class ChainVerifier:
    """Checks the chain in the database against itself, its head MAC and every signed
    checkpoint in ``checkpoint_dir`` that verifies under ``public_key`` (one key, or the current
    one and those retired by rotations).

    ``engine`` must be a plain synchronous engine: on SQLite not the audit writer's, whose every
    transaction takes the write lock.
    """

    def __init__(
        self,
        engine: Engine,
        hmac_key: bytes,
        checkpoint_dir: Path,
        public_key: Ed25519PublicKey | Sequence[Ed25519PublicKey] | None,
        page: int = PAGE,
    ) -> None:
        self._engine = engine
        self._hmac_key = hmac_key
        self._checkpoint_dir = checkpoint_dir
        self._public_key = public_key
        self._page = page
        self._one_at_a_time = asyncio.Lock()
        self._walking = threading.Lock()
        self._running: asyncio.Future[Verification] | None = None

    def run(self) -> Verification:
        """Verify every event up to the head read first, so writers appending meanwhile do not count."""
        with self._walking:
            return self._run()

    def _run(self) -> Verification:
        # The anchor is read before the head: a checkpoint written meanwhile names a head no
        # later than the one read next, so a live service never looks rolled back.
        anchor = read_anchor(self._checkpoint_dir, self._public_key)
        with self._engine.connect() as conn:
            head = conn.execute(select(AuditHead.seq, AuditHead.hash, AuditHead.mac).where(AuditHead.id == 1)).one()
            beyond = conn.scalar(
                select(AuditEvent.seq).where(AuditEvent.seq > head.seq).order_by(AuditEvent.seq).limit(1)
            )
            conn.rollback()
            result = verify(
                _pages(conn, head.seq, self._page),
                head.seq,
                head.hash,
                head.mac,
                self._hmac_key,
                checkpoints=anchor.signed,
            )
        if result.valid and anchor.conflict is not None:
            return _invalid(
                result,
                anchor.conflict,
                f"rollback: two signed checkpoints at seq {anchor.conflict} name different hashes",
                anchor.conflict,
            )
        if result.valid and beyond is not None and beyond != head.seq + 1:
            # Rows past the head that a concurrent writer did not put there (its commit moves the head).
            return _invalid(result, beyond, "event beyond the head")
        if result.valid and anchor.refused:
            return _invalid(
                result,
                None,
                f"checkpoint refused: {anchor.refused} line(s) do not verify under the checkpoint key "
                f"(first at {anchor.first_refused})",
            )
        return result

    async def verify(self) -> Verification:
        """One walk at a time. The turn is handed back when the walk's thread ends, not when the
        caller stops waiting: ``asyncio.Lock`` alone was released on cancellation while the thread
        went on hashing, so repeated cancelled requests ran several full walks at once."""
        await self._one_at_a_time.acquire()
        try:
            walk = asyncio.ensure_future(asyncio.to_thread(self.run))
        except BaseException:
            self._one_at_a_time.release()
            raise
        self._running = walk  # the loop keeps only a weak reference to a task
        walk.add_done_callback(self._walk_done)
        return await asyncio.shield(walk)

    def _walk_done(self, walk: asyncio.Future[Verification]) -> None:
        if not walk.cancelled():
            walk.exception()  # retrieved: a walk nobody waits for any more must not warn at exit
        self._running = None
        self._one_at_a_time.release()


def _invalid(result: Verification, at: int | None, reason: str, checkpoint_seq: int | None = None) -> Verification:
    return Verification(
        valid=False,
        events=result.events,
        head_seq=result.head_seq,
        head_hash=result.head_hash,
        first_broken_seq=at,
        reason=reason,
        checkpoint_seq=result.checkpoint_seq if checkpoint_seq is None else checkpoint_seq,
    )
