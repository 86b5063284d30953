"""API clients: salted key hashes looked up by key id, and the clients' public JWKs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Keys issued before this revision (stored as unsalted SHA-256) cannot be converted: the table
is recreated and clients must be registered again (`medinfer clients register`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.drop_index(op.f("ix_api_client_client_id"), table_name="api_client")
    op.drop_table("api_client")
    op.create_table(
        "api_client",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("salt", sa.String(length=32), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("encryption_jwk", sa.Text(), nullable=True),
        sa.Column("signing_jwk", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_api_client")),
    )
    op.create_index(op.f("ix_api_client_client_id"), "api_client", ["client_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_api_client_client_id"), table_name="api_client")
    op.drop_table("api_client")
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
