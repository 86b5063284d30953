"""Migrations upgrade, downgrade and upgrade again on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.__main__ import main as cli
from app.tables import Base

pytestmark = pytest.mark.integration


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _feedback_table_drift(url: str) -> list[object]:
    """What autogenerate would still change in ``outcome_feedback``: nothing, if revision 0005
    creates the table ``app.tables`` declares (columns, types, unique request id, index)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    return [d for d in diffs if "outcome_feedback" in repr(d)]


def _round_trip(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDINFER_DATABASE_URL", url)
    assert cli(["migrate"]) == 0
    assert {"api_client", "alembic_version", "outcome_feedback"} <= _tables(url)
    assert _feedback_table_drift(url) == []
    assert cli(["migrate", "--downgrade", "--revision", "0004"]) == 0
    assert "outcome_feedback" not in _tables(url)
    assert "pacs_outbox" in _tables(url)
    assert cli(["migrate"]) == 0
    assert "outcome_feedback" in _tables(url)
    assert cli(["migrate", "--downgrade", "--revision", "base"]) == 0
    assert "api_client" not in _tables(url)
    assert cli(["migrate"]) == 0
    assert "api_client" in _tables(url)


def test_migrations_round_trip_on_postgresql(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _round_trip(pg_url, monkeypatch)


def test_migrations_round_trip_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'm.db'}", monkeypatch)
