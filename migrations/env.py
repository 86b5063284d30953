"""Alembic environment: the URL and metadata come from the application, never from this file.

On PostgreSQL, ``medinfer migrate`` runs as the owner of the tables, and when
``MEDINFER_DATABASE_SERVICE_ROLE`` names the role the service runs as, every migration run ends
by setting that role's privileges to exactly :data:`SERVICE_GRANTS` (revoke all, then grant), in
the same transaction. The service then owns nothing: it cannot ``ALTER TABLE ... DISABLE
TRIGGER``, drop the append-only triggers, or update or delete an audit event.
"""

from __future__ import annotations

from typing import Final

from alembic import context
from sqlalchemy import Connection, text

from app.config import Settings, load_settings
from app.db import create_sync_engine
from app.tables import Base

#: Every table the service touches, and the least it needs. A table missing here is not
#: reachable by the service at all: a revision that adds one adds its line here. UPDATE is
#: granted on the columns the service writes, never on the whole row: with the service's
#: credentials a key's scopes, hash or salt cannot be changed, only its revocation recorded
#: (and revision 0007's trigger keeps a revoked key revoked).
SERVICE_GRANTS: Final[dict[str, str]] = {
    "audit_event": "SELECT, INSERT",  # append-only: never UPDATE, DELETE or TRUNCATE
    # The chain lock (SELECT ... FOR UPDATE needs UPDATE on a column) and the new head.
    "audit_head": "SELECT, UPDATE (seq, hash, mac)",
    "api_client": "SELECT, INSERT, UPDATE (revoked_at)",  # register, revoke; keys are never deleted
    "jwe_replay": "SELECT, INSERT, DELETE",  # expired jti rows are purged
    # Delivery state (claim, delivered, failed, requeue); never the destination or the instance UID.
    "pacs_outbox": "SELECT, INSERT, UPDATE (state, attempts, next_attempt_at, delivered_at, last_error, payload)",
    "outcome_feedback": "SELECT, INSERT, DELETE",  # DELETE only to take back unaudited feedback
    "alembic_version": "SELECT",  # the service may check the schema revision
}


def grant_service_role(connection: Connection, role: str) -> None:
    """Give ``role`` exactly :data:`SERVICE_GRANTS` on the tables that exist; idempotent."""
    current = connection.execute(text("SELECT current_user")).scalar_one()
    if not connection.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}).first():
        msg = f"MEDINFER_DATABASE_SERVICE_ROLE: role {role} does not exist; create it (LOGIN, no ownership) first"
        raise RuntimeError(msg)
    if (
        role == current
        or connection.execute(text("SELECT pg_has_role(:role, current_user, 'MEMBER')"), {"role": role}).scalar_one()
    ):
        msg = f"MEDINFER_DATABASE_SERVICE_ROLE: {role} is (or is a member of) the owner {current}; it must not be"
        raise RuntimeError(msg)
    quoted = connection.dialect.identifier_preparer.quote(role)
    # Role names are also validated by the setting's pattern; quoting keeps the statement sound anyway.
    # Revoking a table privilege also revokes it from every column, so column grants of an
    # earlier run (or a wider grant) do not survive.
    connection.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {quoted}"))
    connection.execute(text(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {quoted}"))
    connection.execute(text(f"GRANT USAGE ON SCHEMA public TO {quoted}"))
    for table, privileges in SERVICE_GRANTS.items():
        if connection.execute(text("SELECT to_regclass(:name)"), {"name": f"public.{table}"}).scalar_one():
            connection.execute(text(f"GRANT {privileges} ON TABLE public.{table} TO {quoted}"))
    # nextval() for the tables with generated ids (pacs_outbox, outcome_feedback).
    connection.execute(text(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {quoted}"))


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
                if settings.database_service_role and connection.dialect.name == "postgresql":
                    grant_service_role(connection, settings.database_service_role)
    finally:
        engine.dispose()


run_migrations()
