"""API clients: a ``client_id`` holds at most one unrevoked key.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

Before this revision a second registration under an existing ``client_id`` was accepted, so a
new key could act under an existing caller's name in the audit trail. A partial unique index
(``WHERE revoked_at IS NULL``, on SQLite and PostgreSQL) now refuses a second unrevoked key
for an id; revoked keys stay as history, and an id whose keys are all revoked may be
registered again (an audited, deliberate step).

A database that already holds such duplicates is not changed: the upgrade stops and says how
many ids are affected. Which key of an id is the legitimate one is a decision for an operator,
not for a migration: revoking one automatically could cut off a hospital interface in use, and
keeping both would keep the ambiguity. List them with ``medinfer clients list``, revoke the
keys to retire with ``medinfer clients revoke --client-id ID --key-id KEY`` (both work on the
previous schema), then run ``medinfer migrate`` again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

_ACTIVE = sa.text("revoked_at IS NULL")


def upgrade() -> None:
    duplicated = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT count(*) FROM (SELECT client_id FROM api_client WHERE revoked_at IS NULL "
                "GROUP BY client_id HAVING count(*) > 1) AS duplicated"
            )
        )
        .scalar_one()
    )
    if duplicated:
        msg = (
            f"{duplicated} client id(s) hold more than one unrevoked API key; a client id must name one "
            "caller. Run `medinfer clients list`, revoke the keys to retire with `medinfer clients revoke "
            "--client-id ID --key-id KEY`, then migrate again."
        )
        raise RuntimeError(msg)
    op.create_index(
        "uq_api_client_active_client_id",
        "api_client",
        ["client_id"],
        unique=True,
        sqlite_where=_ACTIVE,
        postgresql_where=_ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("uq_api_client_active_client_id", table_name="api_client")
