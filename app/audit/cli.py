"""The ``medinfer audit`` commands, and the audit writer every CLI command that acts uses."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from app.audit.checkpoint import load_verify_keys
from app.audit.export import to_ndjson_line
from app.audit.query import EventFilter, iter_events
from app.audit.recorder import AuditWriter, create_audit_engine
from app.audit.verifier import ChainVerifier
from app.config import Settings
from app.db import create_async_db, create_sync_engine
from app.domain import AuditRecord
from app.observability.metrics import Metrics


@contextlib.asynccontextmanager
async def cli_audit_writer(settings: Settings) -> AsyncIterator[AuditWriter]:
    """An audit writer for one command: what an operator does from the CLI is audited too."""
    engine = create_audit_engine(settings.sqlalchemy_url, settings.database_timeout_s)
    writer = AuditWriter(
        engine,
        settings.audit_hmac_key.get_secret_value().encode(),
        settings.pseudonym_key.get_secret_value().encode(),
        Metrics(),
    )
    try:
        yield writer
    finally:
        await writer.aclose()
        engine.dispose()


def run_audit_command(settings: Settings, command: str, *, output: str | None = None) -> int:
    """``verify`` (exit 1 and name the first broken link) or ``export`` (FHIR AuditEvent NDJSON)."""

    async def run() -> int:
        engine, _ = create_async_db(settings)
        try:
            async with cli_audit_writer(settings) as writer:
                return await _audit(engine, writer)
        finally:
            await engine.dispose()

    async def _audit(engine: AsyncEngine, writer: AuditWriter) -> int:
        if command == "verify":
            reader = create_sync_engine(settings)
            try:
                result = await ChainVerifier(
                    reader,
                    settings.audit_hmac_key.get_secret_value().encode(),
                    settings.resolved_checkpoint_dir,
                    load_verify_keys(settings),
                ).verify()
            finally:
                reader.dispose()
            outcome = "success" if result.valid else "failure"
            await writer.record(AuditRecord(action="audit.verify", outcome=outcome, actor="cli"))
            print(json.dumps({
                "valid": result.valid, "events": result.events, "head_seq": result.head_seq,
                "first_broken_seq": result.first_broken_seq, "reason": result.reason,
                "checkpoint_seq": result.checkpoint_seq,
            }))  # fmt: skip
            return 0 if result.valid else 1
        await writer.record(AuditRecord(action="audit.export", outcome="success", actor="cli"))
        with Path(str(output)).open("wb") as out:  # noqa: ASYNC230 - one-shot CLI, nothing else on its loop
            async for row in iter_events(engine, EventFilter()):
                out.write(to_ndjson_line(row))
        return 0

    return asyncio.run(run())
