"""Registered API clients: registration and bearer-key authentication against the database."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.domain import Principal, Scope
from app.errors import (
    AuthenticationError,
    ClientExistsError,
    ClientNotFoundError,
    DatabaseUnavailableError,
    InvalidRequestError,
)
from app.security.keys import API_KEY_PREFIX
from app.security.oauth import MAX_CLIENT_ID_CHARS
from app.tables import ApiClient

_MAX_KEY_LEN = 256

#: What a ``client_id`` may be (HTTP schema, path parameter and CLI alike): it names the caller in
#: every audit event, so it is short, printable and fits the trail's ``actor`` column.
CLIENT_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)


#: What names an existing client (revocation): any id a registration may ever have stored, that
#: is 1-128 characters without control characters. Before the pattern above, the CLI stored ids as
#: typed ("HIS Epic", "lab/prod"); they must stay revocable. The value is matched exactly against
#: the stored one, never interpreted, so only what cannot be stored or printed is refused.
STORED_CLIENT_ID_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]+$"
_STORED_CLIENT_ID = re.compile(STORED_CLIENT_ID_PATTERN)


def check_client_id(client_id: str) -> str:
    """``client_id`` if it is 1-128 characters of the allowed set; else :class:`InvalidRequestError`
    (the value itself is not echoed). For new registrations."""
    if not 1 <= len(client_id) <= MAX_CLIENT_ID_CHARS or _CLIENT_ID.fullmatch(client_id) is None:
        raise InvalidRequestError(
            f"client_id must be 1-{MAX_CLIENT_ID_CHARS} characters: letters, digits and . _ : - "
            "(starting with a letter or digit)"
        )
    return client_id


def check_stored_client_id(client_id: str) -> str:
    """``client_id`` if it could name a stored client (:data:`STORED_CLIENT_ID_PATTERN`); else
    :class:`InvalidRequestError` (the value itself is not echoed). For revocation."""
    if not 1 <= len(client_id) <= MAX_CLIENT_ID_CHARS or _STORED_CLIENT_ID.fullmatch(client_id) is None:
        raise InvalidRequestError(f"client_id must be 1-{MAX_CLIENT_ID_CHARS} characters without control characters")
    return client_id


@contextmanager
def client_store() -> Iterator[None]:
    """Translate a failure of the database under the client store into
    :class:`DatabaseUnavailableError` (503 with ``Retry-After``, exit 1 from the CLI), so an
    outage is a retryable refusal, not an unexpected error."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError("client store unavailable", retry_after_s=2) from exc


@dataclass(frozen=True, slots=True)
class ClientKeyInfo:
    """One registered key of a client, as an administrator may see it: never a hash or a salt."""

    client_id: str
    key_id: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    seals_results: bool
    signs_payloads: bool

    @classmethod
    def of(cls, row: ApiClient) -> ClientKeyInfo:
        return cls(
            client_id=row.client_id,
            key_id=row.key_id,
            scopes=tuple(row.scopes.split()),
            created_at=_utc(row.created_at),
            revoked_at=_utc(row.revoked_at) if row.revoked_at is not None else None,
            seals_results=row.encryption_jwk is not None,
            signs_payloads=row.signing_jwk is not None,
        )


def _utc(moment: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; they were written in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class NewClient:
    """A registration's outcome: the API key (shown once) and the id of the key row."""

    api_key: str
    key_id: str


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
) -> NewClient:
    """Store a new client and return its API key, which is not kept anywhere in clear.

    Raises :class:`ClientExistsError` if a client with this id holds an unrevoked key: an id names
    one caller in the audit trail, so a new registration cannot take over an existing one. (The
    partial unique index of revision 0006 enforces the same between concurrent registrations.)
    """
    check_client_id(client_id)
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    for jwk in (encryption_jwk, signing_jwk):
        if jwk is not None and "d" in jwk:
            raise InvalidRequestError("register public keys only (the JWK has a private 'd' member)")
    if _active_keys(db, client_id):
        raise ClientExistsError("a client with this client_id is already registered")
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
    try:
        db.flush()
    except IntegrityError as exc:
        raise ClientExistsError("a client with this client_id is already registered") from exc
    return NewClient(api_key=f"{API_KEY_PREFIX}{key_id}.{secret}", key_id=key_id)


def _active_keys(db: Session, client_id: str) -> Sequence[ApiClient]:
    query = select(ApiClient).where(ApiClient.client_id == client_id, ApiClient.revoked_at.is_(None))
    return db.scalars(query).all()


def list_clients(db: Session) -> list[ClientKeyInfo]:
    """Every registered key, revoked ones included, by client id then age."""
    rows = db.scalars(select(ApiClient).order_by(ApiClient.client_id, ApiClient.created_at, ApiClient.key_id))
    return [ClientKeyInfo.of(row) for row in rows]


def revoke_client(db: Session, client_id: str, *, key_id: str | None = None) -> list[ClientKeyInfo]:
    """Revoke the client's unrevoked keys (or only ``key_id``) and return all of its keys.

    Idempotent: revoking a revoked client changes nothing. Raises :class:`ClientNotFoundError`
    when no key of this client (or no such ``key_id`` of it) was ever registered. The caller
    commits; caches of authenticated keys forget the client separately (:class:`PrincipalCache`).
    Any stored id is accepted (:func:`check_stored_client_id`), also one registered before ids
    were restricted.
    """
    check_stored_client_id(client_id)
    query = select(ApiClient).where(ApiClient.client_id == client_id).order_by(ApiClient.created_at, ApiClient.key_id)
    rows = db.scalars(query).all()
    if key_id is not None:
        rows = [row for row in rows if row.key_id == key_id]
    if not rows:
        raise ClientNotFoundError("no client with this client_id (and key id) is registered")
    now = datetime.now(UTC)
    for row in rows:
        if row.revoked_at is None:
            row.revoked_at = now
    db.flush()
    return [ClientKeyInfo.of(row) for row in rows]


def undo_registration(db: Session, key_id: str) -> None:
    """Revoke a key whose registration could not be audited: it was never shown to anyone, and
    its client id must not stay taken by a registration the trail does not know."""
    row = db.get(ApiClient, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)


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

    def forget_client(self, client_id: str) -> None:
        """Drop the client's cached keys, so a revocation applies at once in this process (other
        replicas and worker processes still admit the key for up to ``ttl_s``)."""
        for key in [key for key, (_, principal) in self._entries.items() if principal.client_id == client_id]:
            del self._entries[key]
