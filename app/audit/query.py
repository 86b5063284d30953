"""Reading the trail: filtered, cursor-paged lists. Queries live here, not in routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.tables import AuditEvent


@dataclass(frozen=True, slots=True)
class EventFilter:
    since: datetime | None = None
    until: datetime | None = None
    model: str | None = None
    actor: str | None = None
    outcome: str | None = None
    action: str | None = None


def _filtered(query: Select[AuditEvent], f: EventFilter) -> Select[AuditEvent]:
    if f.since is not None:
        query = query.where(AuditEvent.occurred_at >= f.since)
    if f.until is not None:
        query = query.where(AuditEvent.occurred_at < f.until)
    for column, value in (
        (AuditEvent.model, f.model),
        (AuditEvent.actor, f.actor),
        (AuditEvent.outcome, f.outcome),
        (AuditEvent.action, f.action),
    ):
        if value is not None:
            query = query.where(column == value)
    return query


async def list_events(engine: AsyncEngine, f: EventFilter, after_seq: int, limit: int) -> Sequence[AuditEvent]:
    """Up to ``limit`` events after ``after_seq`` (the cursor), oldest first."""
    query = _filtered(select(AuditEvent), f).where(AuditEvent.seq > after_seq).order_by(AuditEvent.seq).limit(limit)
    async with AsyncSession(engine) as session:
        return (await session.scalars(query)).all()


async def iter_events(engine: AsyncEngine, f: EventFilter, page: int = 1000) -> AsyncIterator[AuditEvent]:
    after = 0
    while True:
        rows = await list_events(engine, f, after, page)
        for row in rows:
            yield row
        if len(rows) < page:
            return
        after = rows[-1].seq
