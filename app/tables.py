"""SQLAlchemy 2 tables. Wire schemas live in ``transport/http/schemas.py``, domain types in
``domain.py``; these are storage only. Alembic migrations in ``migrations/`` create them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, MetaData, String, Text
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
    """A registered caller (HIS, PACS bridge, operator tool) and the scopes it holds.

    Only the SHA-256 of the API key is stored; the key itself is shown once, at registration.
    """

    __tablename__ = "api_client"

    key_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128), index=True)
    scopes: Mapped[str] = mapped_column(Text, doc="Space-separated scope names.")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
