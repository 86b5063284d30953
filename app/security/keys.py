"""Key material on disk: API keys (hashed at rest) and the service's JWE key pairs (JWK).

Encryption keys are JSON Web Keys in ``<keys_dir>/<kid>.jwk.json`` (mode 0600). Each carries a
``state``: ``active`` (clients encrypt to it), ``next`` (published ahead of a rotation) or
``retired`` (decrypt-only). The JWE layer that consumes them is built on joserfc.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc.jwk import ECKey

KeyState = Literal["active", "next", "retired"]
API_KEY_PREFIX = "mi_"


def load_ed25519_public_key(path: Path) -> Ed25519PublicKey:
    """The model-release verification key (PEM). Raises ValueError for another key type."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        msg = f"{path}: not an Ed25519 public key"
        raise TypeError(msg)
    return key


def sign_file(private_key_path: Path, target: Path) -> Path:
    """Write ``<target>.sig``: a detached Ed25519 signature over the file's bytes."""
    key = serialization.load_pem_private_key(private_key_path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        msg = f"{private_key_path}: not an Ed25519 private key"
        raise TypeError(msg)
    signature_path = target.with_name(target.name + ".sig")
    signature_path.write_bytes(key.sign(target.read_bytes()))
    return signature_path


def generate_api_key() -> str:
    """A new random API key (256 bits). Shown once; only its hash is stored."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyInfo:
    kid: str
    state: KeyState
    kty: str
    created: str


def _write_private(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)


def generate_encryption_key(keys_dir: Path, state: KeyState = "active") -> KeyInfo:
    """Create an EC P-256 key pair for ECDH-ES+A256KW and store it as a private JWK."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    kid = f"medinfer-{created}-{secrets.token_hex(4)}"
    key = ECKey.generate_key("P-256", parameters={"kid": kid, "use": "enc", "alg": "ECDH-ES+A256KW"})
    record = {"state": state, "created": created, "jwk": key.as_dict(private=True)}
    _write_private(keys_dir / f"{kid}.jwk.json", json.dumps(record, indent=2))
    return KeyInfo(kid=kid, state=state, kty="EC", created=created)


def list_keys(keys_dir: Path) -> list[KeyInfo]:
    """Keys on disk, oldest first. Private material is not returned."""
    infos: list[KeyInfo] = []
    if not keys_dir.is_dir():
        return infos
    for path in sorted(keys_dir.glob("*.jwk.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        jwk = record["jwk"]
        infos.append(KeyInfo(kid=jwk["kid"], state=record["state"], kty=jwk["kty"], created=record["created"]))
    return sorted(infos, key=lambda k: k.created)
