"""API clients: registered callers and their scopes (keys stored as SHA-256 only).

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "api_client",
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_sha256", name=op.f("pk_api_client")),
    )
    op.create_index(op.f("ix_api_client_client_id"), "api_client", ["client_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_api_client_client_id"), table_name="api_client")
    op.drop_table("api_client")
