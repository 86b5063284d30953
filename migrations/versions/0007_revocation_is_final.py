"""API clients: a revoked key stays revoked (PostgreSQL).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

The service role may update ``api_client.revoked_at`` only (``SERVICE_GRANTS`` in
``migrations/env.py``), since that is how a key is revoked. Without more, the same grant would
also let it set ``revoked_at`` back to NULL and bring a revoked key back to life. A row trigger
refuses that, whoever runs the statement; the owner can still drop the trigger, the service
role cannot. To let a client in again, register a new key.

SQLite has no second role to protect against, so the trigger is not created there.
"""

from __future__ import annotations

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

_PG_FUNCTION = """
CREATE FUNCTION medinfer_api_client_revocation_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'api_client: a revoked key stays revoked' USING ERRCODE = 'insufficient_privilege';
END;
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER api_client_revocation_final BEFORE UPDATE OF revoked_at ON api_client "
            "FOR EACH ROW WHEN (OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS NULL) "
            "EXECUTE FUNCTION medinfer_api_client_revocation_final()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS api_client_revocation_final ON api_client")
        op.execute("DROP FUNCTION IF EXISTS medinfer_api_client_revocation_final()")
