"""Writes audit events with group commit, and nothing leaves before its event is committed.

Callers ``await record(event)``. One writer thread per process takes every event queued while
the previous transaction ran and appends them in one transaction under the chain lock (the
``audit_head`` row: ``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so
several processes keep one gap-free chain and a busy service pays one commit per batch, not
per request. The writer has a thread and a synchronous connection of its own, so its
transactions are not stretched by every other coroutine on the event loop. If a transaction
fails, every caller of that batch gets :class:`AuditUnavailableError` and must withhold its
result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, create_engine, event, select, update
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from app.audit.chain import canonical, head_mac, link_hash, mac, pseudonym, utcnow
from app.domain import AuditRecord
from app.errors import AuditUnavailableError, MedinferError
from app.observability.metrics import Metrics
from app.tables import AuditEvent, AuditHead

log = logging.getLogger(__name__)

MAX_BATCH = 512
_MAX_DETAIL_VALUES = 1024


def _sqlite_immediate(engine: Engine) -> None:
    """SQLite: take the write lock at BEGIN, so two processes never both read the same head."""

    def on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", on_begin)


def create_audit_engine(url: str, timeout_s: float) -> Engine:
    """The writer's own synchronous engine (one connection is all it uses)."""
    connect_args: dict[str, object] = {}
    if url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(1, int(timeout_s))
    engine = create_engine(url, pool_pre_ping=True, pool_size=1, max_overflow=1, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        _sqlite_immediate(engine)
    return engine


@dataclass(slots=True)
class _Pending:
    record: AuditRecord
    occurred_at: datetime
    loop: asyncio.AbstractEventLoop = field(repr=False)
    future: asyncio.Future[int] = field(repr=False)


def _settle(future: asyncio.Future[int], result: int | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _clip(value: object) -> object:
    """Keep detail small: long arrays (e.g. a segmentation mask) are summarised, not stored."""
    if isinstance(value, list) and len(value) > _MAX_DETAIL_VALUES:
        return {"truncated": True, "length": len(value)}
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    return value


class AuditWriter:
    def __init__(self, engine: Engine, hmac_key: bytes, pseudonym_key: bytes, metrics: Metrics) -> None:
        self._engine = engine
        self._hmac_key = hmac_key
        self._pseudonym_key = pseudonym_key
        self._metrics = metrics
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._prepared: tuple[Dialect, str, list[tuple[str, Any]]] | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    async def record(self, record: AuditRecord) -> int:
        """Append ``record``; returns its ``seq`` once committed. Raises :class:`AuditUnavailableError`."""
        if self._closing:
            raise AuditUnavailableError("audit writer is shutting down", retry_after_s=2)
        loop = asyncio.get_running_loop()
        pending = _Pending(record, utcnow(), loop, loop.create_future())
        self._queue.put(pending)
        return await asyncio.shield(pending.future)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._write(batch)
            if stopping:
                return

    def _write(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        outcomes: list[int | BaseException]
        try:
            outcomes = list(self._append(batch))
        except (SQLAlchemyError, OSError):
            self._metrics.audit_failures.inc(len(batch))
            log.exception("audit write failed", extra={"event": "audit.write_failed", "count": len(batch)})
            error: MedinferError = AuditUnavailableError("audit trail unavailable; result withheld", retry_after_s=2)
            outcomes = [error] * len(batch)
        else:
            self._metrics.audit_write_seconds.observe(time.monotonic() - started)
        for pending, outcome in zip(batch, outcomes, strict=True):
            with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
                pending.loop.call_soon_threadsafe(_settle, pending.future, outcome)

    def _row(self, pending: _Pending, seq: int, prev_hash: str) -> dict[str, Any]:
        r = pending.record
        key = self._pseudonym_key
        detail = dict(_clip(dict(r.detail)))  # type: ignore[call-overload]
        if r.series_uid:
            detail["series_pseudonym"] = pseudonym(key, "series", r.series_uid)
        if r.sop_uids:
            detail["sop_pseudonyms"] = [pseudonym(key, "sop", uid) for uid in r.sop_uids]
        row: dict[str, Any] = {
            "seq": seq,
            "occurred_at": pending.occurred_at,
            "request_id": r.request_id,
            "action": r.action,
            "outcome": r.outcome,
            "actor": r.actor,
            "source_ip": r.source_ip,
            "model": r.model,
            "model_version": r.model_version,
            "model_sha256": r.model_sha256,
            "input_sha256": r.input_sha256,
            "output_sha256": r.output_sha256,
            "patient_pseudonym": pseudonym(key, "patient", r.patient_id) if r.patient_id else None,
            "study_pseudonym": pseudonym(key, "study", r.study_uid) if r.study_uid else None,
            "detail": json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str),
        }
        row["prev_hash"] = prev_hash
        row["hash"] = link_hash(prev_hash, canonical(row))
        row["mac"] = mac(self._hmac_key, row["hash"])
        return row

    def _append(self, batch: list[_Pending]) -> list[int]:
        with self._engine.begin() as conn:
            query = select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            head_seq, head_hash = conn.execute(query).one()
            rows = []
            for pending in batch:
                head_seq += 1
                row = self._row(pending, head_seq, head_hash)
                head_hash = row["hash"]
                rows.append(row)
            self._insert(conn, rows)
            conn.execute(
                update(AuditHead)
                .where(AuditHead.id == 1)
                .values(seq=head_seq, hash=head_hash, mac=head_mac(self._hmac_key, head_seq, head_hash))
            )
        return [row["seq"] for row in rows]

    def _insert(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """One driver-level executemany: SQLAlchemy's per-row statement processing cost more CPU
        than the hashing, and this thread shares the interpreter with the event loop."""
        dialect = conn.dialect
        if self._prepared is None or self._prepared[0] is not dialect:
            table = AuditEvent.__table__
            marker = "?" if dialect.paramstyle == "qmark" else "%s"
            columns = [column.name for column in table.columns]
            sql = f"INSERT INTO audit_event ({', '.join(columns)}) VALUES ({', '.join([marker] * len(columns))})"  # noqa: S608 - column names from the table; values are bound  # nosec B608
            processors = [column.type.bind_processor(dialect) for column in table.columns]
            self._prepared = (dialect, sql, list(zip(columns, processors, strict=True)))
        _, sql, plan = self._prepared
        params = [tuple(process(row[name]) if process else row[name] for name, process in plan) for row in rows]
        conn.exec_driver_sql(sql, params)

    async def aclose(self) -> None:
        """Commit what is queued, then stop the thread."""
        self._closing = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
