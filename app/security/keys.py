"""API keys (only their hashes are stored) and the Ed25519 keys that sign model releases.

The service's JWE key pairs live in :mod:`app.security.keystore`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

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
