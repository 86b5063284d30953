"""Verifying the whole trail in bounded memory, off the event loop.

The chain is read a page at a time by keyset (``seq > last ORDER BY seq LIMIT page``) on a
synchronous connection in a worker thread, and each row is hashed and dropped before the next
page is fetched: memory does not grow with the chain, and the event loop (``/livez``, requests)
keeps running while 200,000 events are hashed. One verification runs at a time per process;
further callers wait for it rather than multiply the load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
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
    """Checks the chain in the database against itself, its head MAC and the latest signed
    checkpoint in ``checkpoint_dir``.

    ``engine`` must be a plain synchronous engine: on SQLite not the audit writer's, whose every
    transaction takes the write lock.
    """

    def __init__(
        self,
        engine: Engine,
        hmac_key: bytes,
        checkpoint_dir: Path,
        public_key: Ed25519PublicKey | None,
        page: int = PAGE,
    ) -> None:
        self._engine = engine
        self._hmac_key = hmac_key
        self._checkpoint_dir = checkpoint_dir
        self._public_key = public_key
        self._page = page
        self._one_at_a_time = asyncio.Lock()

    def run(self) -> Verification:
        """Verify every event up to the head read first, so writers appending meanwhile do not count."""
        # The anchor is read before the head: a checkpoint written meanwhile names a head no
        # later than the one read next, so a live service never looks rolled back.
        anchor = read_anchor(self._checkpoint_dir, self._public_key)
        with self._engine.connect() as conn:
            head = conn.execute(select(AuditHead.seq, AuditHead.hash, AuditHead.mac).where(AuditHead.id == 1)).one()
            beyond = conn.scalar(
                select(AuditEvent.seq).where(AuditEvent.seq > head.seq).order_by(AuditEvent.seq).limit(1)
            )
            conn.rollback()
            latest = anchor.latest
            result = verify(
                _pages(conn, head.seq, self._page),
                head.seq,
                head.hash,
                head.mac,
                self._hmac_key,
                anchor=(latest.seq, latest.hash) if latest is not None else None,
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
        async with self._one_at_a_time:
            return await asyncio.to_thread(self.run)


def _invalid(result: Verification, at: int | None, reason: str) -> Verification:
    return Verification(
        valid=False,
        events=result.events,
        head_seq=result.head_seq,
        head_hash=result.head_hash,
        first_broken_seq=at,
        reason=reason,
        checkpoint_seq=result.checkpoint_seq,
    )
