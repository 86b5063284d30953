"""The audit trail for compliance officers: verify, list, export. Scope ``audit:read``.

Verifying and exporting are themselves security-relevant actions and leave events.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Final

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BeforeValidator

from app.audit.export import to_ndjson_line
from app.audit.query import EventFilter, iter_events, list_events
from app.tables import AuditEvent
from app.transport.http.deps import AuditReader, ContainerDep, record_action
from app.transport.http.problems import COMMON_ERRORS, problem_responses
from app.transport.http.schemas import AuditEventOut, AuditEventPage, AuditVerification

router = APIRouter(prefix="/v1/audit")
TAG: Final = "audit"
NDJSON: Final = "application/fhir+ndjson"
#: RFC 3339 ``date-time``, as the document's ``format`` says: pydantic alone would also take a
#: bare number as Unix time, and a time without an offset means a different instant per server.
_RFC3339: Final = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
#: What the database can hold and be compared with: no NUL (PostgreSQL refuses it), no control characters.
_PRINTABLE: Final = r"^[^\x00-\x1f\x7f]+$"
#: The sequence is a PostgreSQL bigint; 18 digits always fit.
_CURSOR: Final = r"^[0-9]{1,18}$"


def _rfc3339(value: object) -> object:
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 date-time with an offset, such as 2026-11-28T13:05:12Z")
    return value


def _in_utc(value: datetime) -> datetime:
    # Events are stored in UTC; SQLite's DateTime drops the offset when it binds a value, so a
    # filter given as +05:30 must be the same instant in UTC before it reaches the query.
    return value.astimezone(UTC)


Timestamp = Annotated[datetime, BeforeValidator(_rfc3339), AfterValidator(_in_utc)]


def _filters(
    since: Annotated[Timestamp | None, Query(description="Events at or after this time (RFC 3339).")] = None,
    until: Annotated[Timestamp | None, Query(description="Events before this time (RFC 3339).")] = None,
    model: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")] = None,
    actor: Annotated[str | None, Query(max_length=128, pattern=_PRINTABLE, description="Client id.")] = None,
    outcome: Annotated[str | None, Query(pattern="^(success|failure|error)$")] = None,
    action: Annotated[str | None, Query(max_length=64, pattern=_PRINTABLE, examples=["inference"])] = None,
) -> EventFilter:
    return EventFilter(since=since, until=until, model=model, actor=actor, outcome=outcome, action=action)


Filters = Annotated[EventFilter, Depends(_filters)]


def _out(row: AuditEvent) -> AuditEventOut:
    return AuditEventOut(
        seq=row.seq,
        occurred_at=row.occurred_at,
        request_id=row.request_id,
        action=row.action,
        outcome=row.outcome,
        actor=row.actor,
        source_ip=row.source_ip,
        model=row.model,
        model_version=row.model_version,
        model_sha256=row.model_sha256,
        input_sha256=row.input_sha256,
        output_sha256=row.output_sha256,
        patient_pseudonym=row.patient_pseudonym,
        study_pseudonym=row.study_pseudonym,
        detail=json.loads(row.detail),
        hash=row.hash,
    )


@router.get(
    "/verify",
    operation_id="verifyAuditChain",
    tags=[TAG],
    summary="Verify the audit chain",
    description=(
        "Walks the whole chain and names the first broken link, if any, then checks it against the latest "
        "signed head checkpoint kept outside the database: events missing up to it are a rollback. Scope "
        "`audit:read`."
    ),
    responses={**problem_responses(401, 403, 503, *COMMON_ERRORS)},
)
async def verify(request: Request, container: ContainerDep, principal: AuditReader) -> AuditVerification:
    result = await container.verifier.verify()
    await record_action(
        request, container, principal, "audit.verify", "success" if result.valid else "failure",
        events=result.events, first_broken_seq=result.first_broken_seq,
    )  # fmt: skip
    return AuditVerification(
        valid=result.valid,
        events=result.events,
        head_seq=result.head_seq,
        head_hash=result.head_hash,
        first_broken_seq=result.first_broken_seq,
        reason=result.reason,
        checkpoint_seq=result.checkpoint_seq,
    )


@router.get(
    "/events",
    operation_id="listAuditEvents",
    tags=[TAG],
    summary="List audit events",
    description=(
        "Oldest first, filtered, cursor-paged: pass `next_cursor` back as `cursor` for the next page. "
        "Patients and studies appear only as keyed pseudonyms. Scope `audit:read`."
    ),
    responses={**problem_responses(401, 403, 422, *COMMON_ERRORS)},
)
async def events(
    container: ContainerDep,
    _principal: AuditReader,
    filters: Filters,
    cursor: Annotated[str | None, Query(pattern=_CURSOR)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditEventPage:
    rows = await list_events(container.engine, filters, int(cursor) if cursor else 0, limit)
    return AuditEventPage(events=[_out(r) for r in rows], next_cursor=str(rows[-1].seq) if len(rows) == limit else None)


@router.get(
    "/export",
    operation_id="exportAuditEvents",
    tags=[TAG],
    summary="Export as FHIR AuditEvent NDJSON",
    description="One FHIR R4 AuditEvent (IHE BALP shape) per line, streamed. Scope `audit:read`.",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {NDJSON: {"schema": {"type": "string"}, "example": '{"resourceType":"AuditEvent","id":"1"}\n'}}
        },
        **problem_responses(401, 403, 422, 503, *COMMON_ERRORS),
    },
)
async def export(
    request: Request, container: ContainerDep, principal: AuditReader, filters: Filters
) -> StreamingResponse:
    await record_action(request, container, principal, "audit.export", "success")

    async def lines() -> AsyncIterator[bytes]:
        async for row in iter_events(container.engine, filters):
            yield to_ndjson_line(row)

    return StreamingResponse(lines(), media_type=NDJSON)
