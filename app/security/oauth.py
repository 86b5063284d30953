"""OAuth2 bearer JWTs from the hospital's identity provider (Keycloak, SMART Backend Services).

Validated against a JWKS file the operator provides (``MEDINFER_OAUTH_JWKS_FILE``; the service
fetches nothing at run time), with pinned algorithms and checks on ``iss``, ``aud``, ``exp`` and
``nbf``. Scopes come from the ``scope`` claim; SMART-style ``system/<scope>`` is understood.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Final

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from app.domain import Principal, Scope
from app.errors import AuthenticationError

ALGORITHMS: Final = ("RS256", "ES256", "PS256")
_LEEWAY_S: Final = 30
MAX_CLIENT_ID_CHARS: Final = 128


class OAuthVerifier:
    def __init__(self, jwks_file: Path, issuer: str, audience: str) -> None:
        self._keys = KeySet.import_key_set(json.loads(jwks_file.read_text(encoding="utf-8")))
        self._issuer = issuer
        self._audience = audience

    def principal(self, token: str) -> Principal:
        """The caller behind a bearer JWT; :class:`AuthenticationError` if anything is off."""
        try:
            decoded = jwt.decode(token, self._keys, algorithms=list(ALGORITHMS))
            claims: dict[str, Any] = dict(decoded.claims)
            registry = jwt.JWTClaimsRegistry(
                now=int(time.time()),
                leeway=_LEEWAY_S,
                iss={"essential": True, "value": self._issuer},
                aud={"essential": True, "value": self._audience},
                exp={"essential": True},
            )
            registry.validate(claims)
        except (JoseError, ValueError, TypeError) as exc:
            raise AuthenticationError("bearer token is not valid for this service") from exc
        client_id = claims.get("client_id") or claims.get("azp") or claims.get("sub")
        if not isinstance(client_id, str) or not client_id:
            raise AuthenticationError("bearer token names no client")
        if len(client_id) > MAX_CLIENT_ID_CHARS:
            # The audit trail's actor holds 128 characters: a longer id would fail the audit write
            # (a 503 the client retries for ever), so it is refused here, for good.
            raise AuthenticationError(f"bearer token's client id is longer than {MAX_CLIENT_ID_CHARS} characters")
        granted = set()
        for item in str(claims.get("scope", "")).split():
            name = item.removeprefix("system/")
            if name in {s.value for s in Scope}:
                granted.add(Scope(name))
        return Principal(client_id=client_id, scopes=frozenset(granted))
