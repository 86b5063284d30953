"""Registered API clients: registration and bearer-key authentication against the database."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.domain import Principal, Scope
from app.errors import AuthenticationError, InvalidRequestError
from app.security.keys import API_KEY_PREFIX
from app.tables import ApiClient

_MAX_KEY_LEN = 256


def parse_scopes(raw: Iterable[str]) -> frozenset[Scope]:
    try:
        return frozenset(Scope(s) for s in raw)
    except ValueError as exc:
        valid = ", ".join(s.value for s in Scope)
        raise InvalidRequestError(f"unknown scope; valid scopes: {valid}") from exc


def _hash(salt: str, secret: str) -> str:
    return hmac.new(salt.encode(), secret.encode(), hashlib.sha256).hexdigest()


def register_client(
    db: Session,
    client_id: str,
    scopes: Iterable[Scope],
    *,
    encryption_jwk: Mapping[str, Any] | None = None,
    signing_jwk: Mapping[str, Any] | None = None,
) -> str:
    """Store a new client and return its API key, which is not kept anywhere in clear."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    for jwk in (encryption_jwk, signing_jwk):
        if jwk is not None and "d" in jwk:
            raise InvalidRequestError("register public keys only (the JWK has a private 'd' member)")
    db.add(
        ApiClient(
            key_id=key_id,
            client_id=client_id,
            salt=salt,
            key_hash=_hash(salt, secret),
            scopes=" ".join(sorted(s.value for s in scopes)),
            encryption_jwk=json.dumps(dict(encryption_jwk)) if encryption_jwk else None,
            signing_jwk=json.dumps(dict(signing_jwk)) if signing_jwk else None,
            created_at=datetime.now(UTC),
        )
    )
    return f"{API_KEY_PREFIX}{key_id}.{secret}"


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
    key_id, dot, secret = token.removeprefix(API_KEY_PREFIX).partition(".")
    if len(token) > _MAX_KEY_LEN or not token.startswith(API_KEY_PREFIX) or not dot or not key_id.isalnum():
        raise AuthenticationError("unknown or revoked API key")
    row = await db.get(ApiClient, key_id)
    # Compare even when the id is unknown, so timing says nothing about which ids exist.
    expected = row.key_hash if row is not None else _hash("unknown", "unknown")
    if not hmac.compare_digest(expected, _hash(row.salt if row else "unknown", secret)) or row is None:
        raise AuthenticationError("unknown or revoked API key")
    if row.revoked_at is not None:
        raise AuthenticationError("unknown or revoked API key")
    return Principal(
        client_id=row.client_id,
        scopes=parse_scopes(row.scopes.split()),
        encryption_jwk=json.loads(row.encryption_jwk) if row.encryption_jwk else None,
        signing_jwk=json.loads(row.signing_jwk) if row.signing_jwk else None,
    )


class PrincipalCache:
    """Authenticated API keys for a few seconds, so a busy client costs no database read per call.

    Revoking a key takes effect within ``ttl_s``. Keyed by a hash of the presented credential;
    failures are never cached.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: dict[bytes, tuple[float, Principal]] = {}

    @staticmethod
    def _key(credential: str) -> bytes:
        return hashlib.sha256(credential.encode()).digest()

    def get(self, credential: str) -> Principal | None:
        if self._ttl_s <= 0:
            return None
        entry = self._entries.get(self._key(credential))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, credential: str, principal: Principal) -> None:
        if self._ttl_s <= 0:
            return
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[self._key(credential)] = (time.monotonic() + self._ttl_s, principal)
