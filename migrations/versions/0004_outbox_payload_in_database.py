"""PACS outbox: the sealed SR lives in its row, so any replica can deliver any result.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

Before this revision each SR was a sealed file on the data volume of the replica that made it,
and only that replica could deliver it: a replica replaced with its volume took its undelivered
results with it. Rows made before keep ``payload_path`` and are still read from their file.
A downgrade refuses while a row that is not delivered has only a database payload, since the
older code could not deliver it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("pacs_outbox") as batch:
        batch.add_column(sa.Column("payload", sa.LargeBinary(), nullable=True))
        batch.alter_column("payload_path", existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    bind = op.get_bind()
    stranded = bind.execute(
        sa.text("SELECT count(*) FROM pacs_outbox WHERE payload_path IS NULL AND state <> 'delivered'")
    ).scalar_one()
    if stranded:
        msg = f"{stranded} undelivered PACS results exist only in the database; deliver them before downgrading"
        raise RuntimeError(msg)
    op.execute(sa.text("UPDATE pacs_outbox SET payload_path = '' WHERE payload_path IS NULL"))
    with op.batch_alter_table("pacs_outbox") as batch:
        batch.alter_column("payload_path", existing_type=sa.Text(), nullable=False)
        batch.drop_column("payload")
