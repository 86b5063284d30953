"""Encryption at rest for what holds PHI: spooled DICOM instances (files) and outbound DICOM SR
(database rows of the PACS outbox).

Each file is AES-256-GCM under a key derived (HKDF-SHA256) from ``MEDINFER_KEY_ENCRYPTION_KEY``
with its own purpose label, and its name is bound in as associated data, so a file renamed or
moved to another purpose does not open. Writes are atomic (temporary file, fsync, rename) so a
crash leaves either the whole file or none.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC: Final = b"MISEAL1\n"
_NONCE_BYTES: Final = 12


class SealedFileError(Exception):
    """A sealed file is truncated, tampered with, or sealed under another key or purpose."""


class SealedFiles:
    """One directory of sealed files for one purpose (``spool``, ``outbox``)."""

    def __init__(self, directory: Path, key_encryption_key: str, purpose: str) -> None:
        self.directory = directory
        self.purpose = purpose
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"medinfer-at-rest", info=purpose.encode()).derive(
            key_encryption_key.encode()
        )
        self._aead = AESGCM(key)

    def ensure(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def seal(self, name: str, data: bytes) -> bytes:
        """``data`` sealed under this purpose and ``name`` (stored elsewhere, e.g. in a database row)."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, data, self._aad(name))

    def unseal(self, name: str, blob: bytes) -> bytes:
        """Open what :meth:`seal` made under the same purpose and ``name``."""
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _NONCE_BYTES + 16:
            msg = "not a sealed file"
            raise SealedFileError(msg)
        nonce = blob[len(MAGIC) : len(MAGIC) + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[len(MAGIC) + _NONCE_BYTES :], self._aad(name))
        except InvalidTag as exc:
            msg = "sealed file does not verify"
            raise SealedFileError(msg) from exc

    def write(self, name: str, data: bytes) -> Path:
        """Seal ``data`` into ``<directory>/<name>``; raises :class:`OSError` (e.g. ENOSPC)."""
        self.ensure()
        path = self.directory / name
        blob = self.seal(name, data)
        tmp = path.with_name(f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return path

    def read(self, path: Path) -> bytes:
        return self.unseal(path.name, path.read_bytes())

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def names(self, suffix: str = "") -> list[Path]:
        """The complete sealed files (not temporaries), oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if not p.name.startswith(".") and p.name.endswith(suffix)]
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def _aad(self, name: str) -> bytes:
        return f"{self.purpose}/{name}".encode()
