"""The replay cache of signed payloads: each ``jti`` is accepted once, across every replica.

A token is accepted while ``iat - skew <= now < exp + skew``, so its ``jti`` is kept until
``exp + skew``: forgetting it at ``exp`` (as before) let the same token in again for a whole
skew window. The key is a digest of the client id and the ``jti``, a fixed 64 characters
whatever the client sent, so no value can overflow the column.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.errors import AuthenticationError, DatabaseUnavailableError
from app.tables import JweReplay


def replay_key(client_id: str, jti: str) -> str:
    """The stored key: SHA-256 over the client and its ``jti`` (each client has its own ``jti`` space)."""
    return hashlib.sha256(f"{client_id}\x00{jti}".encode()).hexdigest()


async def accept_once(
    sessionmaker: async_sessionmaker[AsyncSession],
    client_id: str,
    jti: str,
    expires_at: int,
    *,
    clock_skew_s: int,
    now: datetime | None = None,
) -> None:
    """Record ``jti``; a second use while any accepted clock would still take the token is refused."""
    moment = now or datetime.now(UTC)
    keep_until = datetime.fromtimestamp(expires_at, UTC) + timedelta(seconds=clock_skew_s)
    async with sessionmaker() as db:
        try:
            await db.execute(delete(JweReplay).where(JweReplay.expires_at < moment))
            db.add(JweReplay(jti=replay_key(client_id, jti), client_id=client_id[:128], expires_at=keep_until))
            await db.commit()
        except IntegrityError as exc:
            raise AuthenticationError("payload was already used (replay)") from exc
        except SQLAlchemyError as exc:
            raise DatabaseUnavailableError("replay cache unavailable", retry_after_s=2) from exc
