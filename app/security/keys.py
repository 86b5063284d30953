"""API keys (only their hashes are stored) and the Ed25519 keys that sign model releases.

The service's JWE key pairs live in :mod:`app.security.keystore`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

KeyState = Literal["active", "next", "retired"]
API_KEY_PREFIX = "mi_"


def load_ed25519_public_key(path: Path) -> Ed25519PublicKey:
    """The model-release verification key (PEM). Raises ValueError for another key type."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        msg = f"{path}: not an Ed25519 public key"
        raise TypeError(msg)
    return key
