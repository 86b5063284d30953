"""SQLAlchemy 2 tables. Wire schemas live in ``transport/http/schemas.py``, domain types in
``domain.py``; these are storage only. Alembic migrations in ``migrations/`` create them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Float, Index, Integer, LargeBinary, MetaData, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ApiClient(Base):
    """A registered caller (HIS, PACS bridge, operator tool), its scopes and its public keys.

    API keys read ``mi_<key_id>.<secret>``; only ``HMAC-SHA256(salt, secret)`` is stored, and it
    is compared in constant time. ``encryption_jwk`` (results are sealed to it on request) and
    ``signing_jwk`` (when set, payloads must be signed, then encrypted) are public JWKs.

    One row per key. A ``client_id`` holds at most one unrevoked key (a partial unique index), so
    an id names one caller in the audit trail; revoked rows stay, and the id may be registered
    again once every key it held is revoked.
    """

    __tablename__ = "api_client"
    __table_args__ = (
        Index(
            "uq_api_client_active_client_id",
            "client_id",
            unique=True,
            sqlite_where=text("revoked_at IS NULL"),
            postgresql_where=text("revoked_at IS NULL"),
        ),
    )

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128), index=True)
    salt: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[str] = mapped_column(Text, doc="Space-separated scope names.")
    encryption_jwk: Mapped[str | None] = mapped_column(Text, nullable=True)
    signing_jwk: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEvent(Base):
    """One link of the append-only, hash-chained audit trail. Identifiers are HMAC pseudonyms.

    ``seq`` is assigned under the chain lock (the ``audit_head`` row), so it is gap-free: a
    missing number is a deleted event. ``hash`` = SHA-256(prev_hash || canonical JSON of the
    event), ``mac`` = HMAC-SHA256(server key, hash).
    """

    __tablename__ = "audit_event"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    actor: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    source_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    model_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    input_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    output_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    study_pseudonym: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(Text, doc="Canonical JSON: error code, probabilities, pseudonymised UIDs.")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's head, one row (id 1). Locking it serialises writers across processes, and its
    MAC lets ``verify`` notice events deleted from the end of the chain."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str | None] = mapped_column(String(64), nullable=True)


class JweReplay(Base):
    """``jti`` values already accepted, kept until their token expires (shared by replicas)."""

    __tablename__ = "jwe_replay"

    jti: Mapped[str] = mapped_column(String(256), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class PacsOutbox(Base):
    """Results waiting to be delivered to a PACS (DICOM SR), retried until delivered once."""

    __tablename__ = "pacs_outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    destination: Mapped[str] = mapped_column(String(128))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    payload: Mapped[bytes | None] = mapped_column(
        LargeBinary, nullable=True, doc="The SR object, sealed (AES-256-GCM) under the outbox purpose and its UID."
    )
    payload_path: Mapped[str | None] = mapped_column(
        Text, nullable=True, doc="Rows before revision 0004: the sealed file on the replica that made it."
    )
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(256), nullable=True)


class OutcomeFeedback(Base):
    """A confirmed outcome for one inference result, the ground truth behind the running
    sensitivity, specificity and calibration of each model version.

    PHI-free by construction: the result is named by its request id (as the audit trail keeps it),
    the prediction by numbers and label names copied from its audit event, the outcome by a label
    name and a reason from a fixed vocabulary. No free text, so nothing typed at a bedside lands
    here. ``request_id`` is unique: a result is judged once.
    """

    __tablename__ = "outcome_feedback"
    __table_args__ = (Index("ix_outcome_feedback_model_version", "model", "version"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    audit_seq: Mapped[int] = mapped_column(BigInteger, doc="The inference audit event the result came from.")
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(16))
    model_sha256: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(
        Float, nullable=True, doc="The positive label's probability (None for models without one)."
    )
    decided_label: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    operating_point: Mapped[str | None] = mapped_column(String(64), nullable=True)
    confirmed_label: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16), doc="agree, disagree or label.")
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True, doc="How it was confirmed (coded).")
    recorded_by: Mapped[str] = mapped_column(String(128), doc="The client id that recorded it.")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
