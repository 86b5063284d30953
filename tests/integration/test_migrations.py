"""Migrations upgrade, downgrade and upgrade again on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from app.__main__ import main as cli

pytestmark = pytest.mark.integration


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _round_trip(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDINFER_DATABASE_URL", url)
    assert cli(["migrate"]) == 0
    assert {"api_client", "alembic_version"} <= _tables(url)
    assert cli(["migrate", "--downgrade", "--revision", "base"]) == 0
    assert "api_client" not in _tables(url)
    assert cli(["migrate"]) == 0
    assert "api_client" in _tables(url)


def test_migrations_round_trip_on_postgresql(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _round_trip(pg_url, monkeypatch)


def test_migrations_round_trip_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'm.db'}", monkeypatch)
