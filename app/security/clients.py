"""Registered API clients: registration and bearer-key authentication against the database."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.domain import Principal, Scope
from app.errors import AuthenticationError, InvalidRequestError
from app.security.keys import API_KEY_PREFIX, generate_api_key, hash_api_key
from app.tables import ApiClient

_MAX_KEY_LEN = 256


def parse_scopes(raw: Iterable[str]) -> frozenset[Scope]:
    try:
        return frozenset(Scope(s) for s in raw)
    except ValueError as exc:
        valid = ", ".join(s.value for s in Scope)
        raise InvalidRequestError(f"unknown scope; valid scopes: {valid}") from exc


def register_client(db: Session, client_id: str, scopes: Iterable[Scope]) -> str:
    """Store a new client and return its API key, which is not kept anywhere in clear."""
    key = generate_api_key()
    db.add(
        ApiClient(
            key_sha256=hash_api_key(key),
            client_id=client_id,
            scopes=" ".join(sorted(s.value for s in scopes)),
            created_at=datetime.now(UTC),
        )
    )
    return key


async def authenticate(db: AsyncSession, authorization: str | None) -> Principal:
    """Resolve ``Authorization: Bearer <key>`` to a :class:`Principal`.

    Raises :class:`AuthenticationError` with a reason that never echoes the presented key.
    """
    if not authorization:
        raise AuthenticationError("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Authorization must use the Bearer scheme")
    if len(token) > _MAX_KEY_LEN or not token.startswith(API_KEY_PREFIX):
        raise AuthenticationError("unknown or revoked API key")
    row = await db.scalar(select(ApiClient).where(ApiClient.key_sha256 == hash_api_key(token)))
    if row is None or row.revoked_at is not None:
        raise AuthenticationError("unknown or revoked API key")
    return Principal(client_id=row.client_id, scopes=parse_scopes(row.scopes.split()))
