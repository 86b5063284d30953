"""Database engines from :class:`~app.config.Settings`. Created by the container, never at import."""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from app.config import Settings


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _prepare_sqlite_dir(settings: Settings) -> None:
    if settings.sqlalchemy_url.startswith("sqlite") and settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)


def create_sync_engine(settings: Settings) -> Engine:
    """For Alembic and CLI commands."""
    _prepare_sqlite_dir(settings)
    engine = create_engine(settings.sqlalchemy_url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def create_async_db(settings: Settings) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """The service's engine and session factory."""
    _prepare_sqlite_dir(settings)
    connect_args: dict[str, object] = {}
    if settings.async_sqlalchemy_url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(1, int(settings.database_timeout_s))
    engine = create_async_engine(settings.async_sqlalchemy_url, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine, async_sessionmaker(engine, expire_on_commit=False)


async def database_reachable(engine: AsyncEngine, timeout_s: float) -> bool:
    """``SELECT 1`` within ``timeout_s``; False on any database error or time-out."""
    try:
        async with asyncio.timeout(timeout_s), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError, TimeoutError):
        return False
    return True
