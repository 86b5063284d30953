"""The service's JWE key pairs: states, rotation, encryption at rest, and the public JWKS.

Each key is ``<keys_dir>/<kid>.key.json`` (mode 0600) holding its metadata and the private JWK
sealed as a JWE (``dir`` + A256GCM) under a key-encryption key derived from
``MEDINFER_KEY_ENCRYPTION_KEY``: a copy of the directory alone opens nothing. States:
``active`` (clients encrypt to it), ``next`` (published ahead of a rotation), ``retired``
(still opens payloads until ``retire_until``, then ignored).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from joserfc import jwe
from joserfc.jwk import ECKey, OctKey, RSAKey

KeyState = Literal["active", "next", "retired"]
KeyAlg = Literal["ECDH-ES+A256KW", "RSA-OAEP-256"]
_SEAL = jwe.JWERegistry(algorithms=["dir", "A256GCM"])
_SUFFIX = ".key.json"


def _kek(passphrase: str) -> OctKey:
    # The secret is a high-entropy string from the environment; SHA-256 fits it to 256 bits.
    return OctKey.import_key(hashlib.sha256(b"medinfer-kek:" + passphrase.encode()).digest())


@dataclass(frozen=True, slots=True)
class StoredKey:
    kid: str
    alg: KeyAlg
    state: KeyState
    created: datetime
    retire_until: datetime | None
    key: ECKey | RSAKey

    def usable_for_decryption(self, now: datetime) -> bool:
        return self.state != "retired" or (self.retire_until is not None and now < self.retire_until)

    def public_jwk(self) -> dict[str, Any]:
        jwk = self.key.as_dict(private=False)
        return jwk | {"kid": self.kid, "use": "enc", "alg": self.alg}


class KeyStore:
    """Keys on disk, read once per process (reload by restarting or calling :meth:`load`)."""

    def __init__(self, keys_dir: Path, key_encryption_key: str) -> None:
        self.keys_dir = keys_dir
        self._kek = _kek(key_encryption_key)
        self.keys: list[StoredKey] = []

    def load(self) -> KeyStore:
        keys = []
        if self.keys_dir.is_dir():
            for path in sorted(self.keys_dir.glob("*" + _SUFFIX)):
                record = json.loads(path.read_text(encoding="utf-8"))
                sealed = jwe.decrypt_compact(record["sealed"], self._kek, registry=_SEAL)
                jwk = json.loads(sealed.plaintext or b"{}")
                key: ECKey | RSAKey = ECKey.import_key(jwk) if jwk["kty"] == "EC" else RSAKey.import_key(jwk)
                keys.append(
                    StoredKey(
                        kid=record["kid"],
                        alg=record["alg"],
                        state=record["state"],
                        created=datetime.fromisoformat(record["created"]),
                        retire_until=datetime.fromisoformat(record["retire_until"])
                        if record.get("retire_until")
                        else None,
                        key=key,
                    )
                )
        self.keys = sorted(keys, key=lambda k: k.created)
        return self

    def _write(self, stored: StoredKey) -> None:
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        sealed = jwe.encrypt_compact(
            {"alg": "dir", "enc": "A256GCM", "cty": "jwk+json"},
            json.dumps(stored.key.as_dict(private=True)).encode(),
            self._kek,
            registry=_SEAL,
        )
        record = {
            "kid": stored.kid,
            "alg": stored.alg,
            "state": stored.state,
            "created": stored.created.isoformat(),
            "retire_until": stored.retire_until.isoformat() if stored.retire_until else None,
            "sealed": sealed,
        }
        path = self.keys_dir / f"{stored.kid}{_SUFFIX}"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record, indent=2))
        tmp.replace(path)

    def generate(self, state: KeyState = "active", alg: KeyAlg = "ECDH-ES+A256KW") -> StoredKey:
        now = datetime.now(UTC)
        kid = f"medinfer-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
        key: ECKey | RSAKey = (
            ECKey.generate_key("P-256", parameters={"kid": kid})
            if alg == "ECDH-ES+A256KW"
            else RSAKey.generate_key(3072, parameters={"kid": kid})
        )
        stored = StoredKey(kid=kid, alg=alg, state=state, created=now, retire_until=None, key=key)
        self._write(stored)
        self.keys.append(stored)
        return stored

    def rotate(self, retention: timedelta) -> StoredKey:
        """Promote ``next`` (or a new key) to active; the old active opens payloads for ``retention``."""
        now = datetime.now(UTC)
        promoted = next((k for k in self.keys if k.state == "next"), None) or self.generate("next")
        for stored in list(self.keys):
            if stored.state == "active":
                self._replace(stored, state="retired", retire_until=now + retention)
        return self._replace(promoted, state="active", retire_until=None)

    def _replace(self, stored: StoredKey, *, state: KeyState, retire_until: datetime | None) -> StoredKey:
        updated = StoredKey(stored.kid, stored.alg, state, stored.created, retire_until, stored.key)
        self._write(updated)
        self.keys = [updated if k.kid == stored.kid else k for k in self.keys]
        return updated

    def decryption_keys(self, now: datetime | None = None) -> dict[str, StoredKey]:
        moment = now or datetime.now(UTC)
        return {k.kid: k for k in self.keys if k.usable_for_decryption(moment)}

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """Public keys clients may encrypt to: the active one and the one published next."""
        return {"keys": [k.public_jwk() for k in self.keys if k.state in {"active", "next"}]}

    def rotation_due(self, max_age: timedelta) -> list[tuple[str, float]]:
        """(kid, Unix time) at which each published key should have been rotated out."""
        return [(k.kid, (k.created + max_age).timestamp()) for k in self.keys if k.state in {"active", "next"}]
