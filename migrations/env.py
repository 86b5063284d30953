"""Alembic environment: the URL and metadata come from the application, never from this file."""

from __future__ import annotations

from alembic import context

from app.config import Settings, load_settings
from app.db import create_sync_engine
from app.tables import Base


def run_migrations() -> None:
    settings = context.config.attributes.get("settings")
    if not isinstance(settings, Settings):
        settings = load_settings()
    engine = create_sync_engine(settings)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations()
