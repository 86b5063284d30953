"""Outcome feedback: one confirmed outcome per inference result, PHI-free.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

The running sensitivity, specificity and calibration of each model version are computed from
this table (``app/feedback.py``). Rows hold label names, numbers copied from the result's audit
event, a coded reason and the client id, never free text.

Role grant for production (run by a DBA): feedback is recorded once and never edited.

    GRANT SELECT, INSERT, DELETE ON outcome_feedback TO medinfer_app;
    GRANT USAGE ON SEQUENCE outcome_feedback_id_seq TO medinfer_app;

DELETE is there only so that a feedback whose audit event could not be written is taken back.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "outcome_feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("audit_seq", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=16), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("decided_label", sa.String(length=64), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("operating_point", sa.String(length=64), nullable=True),
        sa.Column("confirmed_label", sa.String(length=64), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("recorded_by", sa.String(length=128), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outcome_feedback")),
        sa.UniqueConstraint("request_id", name=op.f("uq_outcome_feedback_request_id")),
    )
    op.create_index("ix_outcome_feedback_model_version", "outcome_feedback", ["model", "version"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_outcome_feedback_model_version", table_name="outcome_feedback")
    op.drop_table("outcome_feedback")
