"""Audit trail (hash chain and its head), JWE replay cache, PACS outbox; append-only triggers on PostgreSQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Role grants for production (run by a DBA; the service role must not own the tables):

    GRANT SELECT, INSERT ON audit_event TO medinfer_app;
    GRANT SELECT, UPDATE ON audit_head TO medinfer_app;
    GRANT SELECT, INSERT, DELETE ON jwe_replay TO medinfer_app;
    GRANT SELECT, INSERT, UPDATE ON pacs_outbox TO medinfer_app;
    GRANT USAGE ON SEQUENCE pacs_outbox_id_seq TO medinfer_app;

The triggers below refuse UPDATE, DELETE and TRUNCATE on audit_event even for the owner.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

GENESIS = "0" * 64

_PG_FUNCTION = """
CREATE FUNCTION medinfer_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_event is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$
"""


def upgrade() -> None:
    op.create_table(
        "audit_event",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=True),
        sa.Column("source_ip", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=16), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("input_sha256", sa.String(length=64), nullable=True),
        sa.Column("output_sha256", sa.String(length=64), nullable=True),
        sa.Column("patient_pseudonym", sa.String(length=64), nullable=True),
        sa.Column("study_pseudonym", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("mac", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_event")),
    )
    for column in ("occurred_at", "action", "outcome", "actor", "model", "patient_pseudonym"):
        op.create_index(op.f(f"ix_audit_event_{column}"), "audit_event", [column], unique=False)
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("mac", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS, "mac": None}])
    op.create_table(
        "jwe_replay",
        sa.Column("jti", sa.String(length=256), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("jti", name=op.f("pk_jwe_replay")),
    )
    op.create_index(op.f("ix_jwe_replay_expires_at"), "jwe_replay", ["expires_at"], unique=False)
    op.create_table(
        "pacs_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("payload_path", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=256), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pacs_outbox")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_pacs_outbox_sop_instance_uid")),
    )
    op.create_index(op.f("ix_pacs_outbox_state"), "pacs_outbox", ["state"], unique=False)
    op.create_index(op.f("ix_pacs_outbox_next_attempt_at"), "pacs_outbox", ["next_attempt_at"], unique=False)

    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER audit_event_no_update_delete BEFORE UPDATE OR DELETE ON audit_event "
            "FOR EACH ROW EXECUTE FUNCTION medinfer_audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event "
            "FOR EACH STATEMENT EXECUTE FUNCTION medinfer_audit_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_truncate ON audit_event")
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_update_delete ON audit_event")
        op.execute("DROP FUNCTION IF EXISTS medinfer_audit_append_only()")
    op.drop_index(op.f("ix_pacs_outbox_next_attempt_at"), table_name="pacs_outbox")
    op.drop_index(op.f("ix_pacs_outbox_state"), table_name="pacs_outbox")
    op.drop_table("pacs_outbox")
    op.drop_index(op.f("ix_jwe_replay_expires_at"), table_name="jwe_replay")
    op.drop_table("jwe_replay")
    op.drop_table("audit_head")
    for column in ("patient_pseudonym", "model", "actor", "outcome", "action", "occurred_at"):
        op.drop_index(op.f(f"ix_audit_event_{column}"), table_name="audit_event")
    op.drop_table("audit_event")
