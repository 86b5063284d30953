"""Signed checkpoints of the audit head, kept outside the database.

The hash chain and the head MAC catch any edit made without the server's HMAC key, but not a
rollback: whoever can read the database can save the ``audit_head`` row, later delete every
event after it and put the row back, and the chain is again complete and self-consistent. So
the head is also anchored outside the database: every ``audit_checkpoint_interval_s`` (and at
start and shutdown) the service signs ``(seq, hash)`` with an Ed25519 key that lives outside the
database, appends it as one JSON line to a file of its own in ``resolved_checkpoint_dir`` (opened
``O_APPEND``, ``fsync``-ed) and logs it (``event: audit.checkpoint``), a second copy in the log
pipeline. ``verify`` checks the chain against every valid checkpoint of every file in the
directory: if the database no longer holds an event a checkpoint names, with the same hash, the
trail was rolled back. Checking only the latest would not do: after a rollback the service
appends new events past the old head, and a checkpoint of that new head would look fine. For
the same reason the :class:`Checkpointer` refuses to sign a head that does not extend the last
head it signed.

A line that does not verify under the trusted key is refused, never used as an anchor: it
proves someone other than the service wrote to the directory, so verification reports it. A
final line without its newline (power loss mid-write) is skipped, and the next append starts on
a fresh line.

The public key is derived from the private key when that is readable; a verifier that holds only
the public key uses ``<key>.pub`` (PEM, written beside the key when the service generates it), or
``audit_checkpoint_key`` may name a public-key PEM directly. Keys the service signed with before a
rotation stay trusted as ``<key>.previous/*.pub`` (public-key PEMs), so the checkpoints they signed
still anchor the chain.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import heapq
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from app.audit.chain import utc_text, utcnow
from app.config import Settings
from app.errors import AuditUnavailableError
from app.tables import AuditEvent, AuditHead

log = logging.getLogger(__name__)

#: Signed together with the fields, so a checkpoint signature can never pass for another
#: Ed25519 signature made with the same key.
_DOMAIN: Final = b"medinfer-audit-checkpoint/v1\n"
SUFFIX: Final = ".checkpoints.jsonl"
_HASH: Final = re.compile(r"[0-9a-f]{64}")
_MAX_LINE: Final = 4096


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: str
    time: str
    replica: str
    key_id: str
    signature: str = ""

    def signed_bytes(self) -> bytes:
        fields = {"seq": self.seq, "hash": self.hash, "time": self.time, "replica": self.replica, "key_id": self.key_id}
        return _DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def line(self) -> bytes:
        fields = {
            "seq": self.seq,
            "hash": self.hash,
            "time": self.time,
            "replica": self.replica,
            "key_id": self.key_id,
            "signature": self.signature,
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(private: Ed25519PrivateKey, seq: int, head_hash: str, moment: datetime, replica: str) -> Checkpoint:
    unsigned = Checkpoint(seq, head_hash, utc_text(moment), replica, key_id(private.public_key()))
    signature = base64.urlsafe_b64encode(private.sign(unsigned.signed_bytes())).rstrip(b"=").decode()
    return Checkpoint(unsigned.seq, unsigned.hash, unsigned.time, unsigned.replica, unsigned.key_id, signature)


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


#: Trusted public keys by key id.
TrustedKeys = Mapping[str, Ed25519PublicKey]


def trusted(keys: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None) -> dict[str, Ed25519PublicKey]:
    """``keys`` (one, several or none) by key id."""
    if keys is None:
        return {}
    if isinstance(keys, Ed25519PublicKey):
        keys = (keys,)
    return {key_id(key): key for key in keys}


def _parse(line: bytes) -> Checkpoint | None:
    """The checkpoint on ``line`` if it is well formed; its signature is not checked."""
    try:
        fields = json.loads(line)
        checkpoint = Checkpoint(
            seq=fields["seq"],
            hash=fields["hash"],
            time=fields["time"],
            replica=fields["replica"],
            key_id=fields["key_id"],
            signature=fields["signature"],
        )
    except (ValueError, KeyError, TypeError):
        return None
    well_formed = (
        type(checkpoint.seq) is int
        and checkpoint.seq >= 0
        and all(isinstance(v, str) for v in (checkpoint.time, checkpoint.replica, checkpoint.key_id))
        and isinstance(checkpoint.hash, str)
        and _HASH.fullmatch(checkpoint.hash) is not None
        and isinstance(checkpoint.signature, str)
    )
    return checkpoint if well_formed else None


def _signed_by(checkpoint: Checkpoint, keys: TrustedKeys) -> bool:
    public = keys.get(checkpoint.key_id)
    if public is None:
        return False
    try:
        public.verify(_b64(checkpoint.signature), checkpoint.signed_bytes())
    except (ValueError, InvalidSignature):
        return False
    return True


def parse_verified(line: bytes, keys: Ed25519PublicKey | Iterable[Ed25519PublicKey] | TrustedKeys) -> Checkpoint | None:
    """The checkpoint on ``line`` if its signature verifies under one of ``keys`` (the one its
    ``key_id`` names); None otherwise."""
    by_id = keys if isinstance(keys, Mapping) else trusted(keys)
    checkpoint = _parse(line)
    return checkpoint if checkpoint is not None and _signed_by(checkpoint, by_id) else None


@dataclass(frozen=True, slots=True)
class Anchor:
    """What the checkpoint directory says.

    ``signed`` maps every seq a trusted checkpoint names to the hash it names (raw digest, 32
    bytes: about 140 bytes of memory per checkpoint). ``conflict`` is the lowest seq for which two
    trusted checkpoints name different hashes: proof, by the service's own signatures, that the
    chain was rolled back and rewritten. ``refused`` counts lines that do not verify (and
    ``first_refused`` says where the first was, as ``file:line``; file names are ours).
    """

    latest: Checkpoint | None
    checkpoints: int
    refused: int
    first_refused: str | None = None
    signed: Mapping[int, bytes] = field(default_factory=dict)
    conflict: int | None = None


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """``(number, line, complete)`` for each line; only the last may lack its newline."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, line, line.endswith(b"\n")


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SUFFIX)) if directory.is_dir() else []


def read_anchor(directory: Path, keys: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None) -> Anchor:
    """Scan every checkpoint file in ``directory`` (one line in memory at a time) and keep the
    ``(seq, hash)`` of each line that verifies under one of ``keys``."""
    by_id = trusted(keys)
    latest: Checkpoint | None = None
    count = refused = 0
    first_refused: str | None = None
    signed: dict[int, bytes] = {}
    conflict: int | None = None
    for path in _files(directory):
        for number, line, complete in _lines(path):
            if not complete or not line.strip():
                continue  # a write cut short by a crash; the writer starts the next on a new line
            checkpoint = parse_verified(line, by_id) if len(line) <= _MAX_LINE else None
            if checkpoint is None:
                refused += 1
                first_refused = first_refused or f"{path.name}:{number}"
                continue
            count += 1
            digest = bytes.fromhex(checkpoint.hash)
            if signed.setdefault(checkpoint.seq, digest) != digest and (conflict is None or checkpoint.seq < conflict):
                conflict = checkpoint.seq
            if latest is None or checkpoint.seq > latest.seq:
                latest = checkpoint
    return Anchor(latest, count, refused, first_refused, signed, conflict)


def latest_signed(directory: Path, keys: TrustedKeys, candidates: int = 8) -> Checkpoint | None:
    """The highest-seq checkpoint in ``directory`` that verifies under ``keys``.

    Cheap for a long history: every line is parsed, but only the ``candidates`` highest seqs
    are checked for their signature; if none of them verifies (lines written by someone else),
    every line is.
    """
    best: list[tuple[int, int, Checkpoint]] = []
    order = 0
    for path in _files(directory):
        for _number, line, complete in _lines(path):
            checkpoint = _parse(line) if complete and len(line) <= _MAX_LINE else None
            if checkpoint is None or checkpoint.key_id not in keys:
                continue
            order += 1
            item = (checkpoint.seq, order, checkpoint)
            if len(best) < candidates:
                heapq.heappush(best, item)
            else:
                heapq.heappushpop(best, item)
    for _seq, _order, checkpoint in sorted(best, reverse=True):
        if _signed_by(checkpoint, keys):
            return checkpoint
    if len(best) < candidates:
        return None  # every well-formed line was a candidate
    return read_anchor(directory, keys.values()).latest


# -- keys ------------------------------------------------------------------------------------


def public_key_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".pub")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def load_signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The checkpoint signing key. Outside production a missing key is generated (with its
    ``.pub`` beside it); production refuses to start without one, since a key the service made
    for itself on a volume an intruder may reach proves little."""
    path = settings.resolved_checkpoint_key
    if not path.exists():
        if settings.env == "production":
            raise AuditUnavailableError(
                "MEDINFER_AUDIT_CHECKPOINT_KEY is missing: production needs an Ed25519 key made outside the service"
            )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        generated = Ed25519PrivateKey.generate()
        pem = generated.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with contextlib.suppress(FileExistsError):  # another process on this volume made it first
            _write_new(path, pem, 0o600)
            public_pem = generated.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            _write_new(public_key_path(path), public_pem, 0o644)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditUnavailableError("MEDINFER_AUDIT_CHECKPOINT_KEY is not an Ed25519 private key")
    return key


def load_verify_key(settings: Settings) -> Ed25519PublicKey | None:
    """The public key checkpoints are verified with: from the private key, from ``<key>.pub``,
    or from the configured path if it holds a public key. None when there is none."""
    path = settings.resolved_checkpoint_key
    for candidate in (path, public_key_path(path)):
        try:
            data = candidate.read_bytes()
        except OSError:
            continue
        key: object
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None)
            key = key.public_key() if isinstance(key, Ed25519PrivateKey) else None
        else:
            key = serialization.load_pem_public_key(data)
        if isinstance(key, Ed25519PublicKey):
            return key
    return None


def previous_keys_dir(key_path: Path) -> Path:
    """Where the public halves of keys retired by a rotation are kept: ``<key>.previous/``."""
    return key_path.with_name(key_path.name + ".previous")


def load_previous_keys(settings: Settings) -> tuple[Ed25519PublicKey, ...]:
    """Every ``*.pub`` (public-key PEM) in ``<key>.previous/``: checkpoints they signed before a
    rotation stay trusted. A file there that is not an Ed25519 public key stops the load: a
    verifier must not silently trust less (or something else) than the operator put there."""
    directory = previous_keys_dir(settings.resolved_checkpoint_key)
    keys: list[Ed25519PublicKey] = []
    for path in sorted(directory.glob("*.pub")) if directory.is_dir() else []:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise AuditUnavailableError(
                f"previous checkpoint key {path.name} is not a readable PEM public key"
            ) from exc
        if not isinstance(key, Ed25519PublicKey):
            raise AuditUnavailableError(f"previous checkpoint key {path.name} is not an Ed25519 public key")
        keys.append(key)
    return tuple(keys)


def load_verify_keys(settings: Settings) -> tuple[Ed25519PublicKey, ...]:
    """Every key a checkpoint may be signed with: the current one (:func:`load_verify_key`) and
    those retired by rotations (:func:`load_previous_keys`)."""
    current = load_verify_key(settings)
    return (*(() if current is None else (current,)), *load_previous_keys(settings))


def replica_id() -> str:
    """This host's name, as a file name: each replica appends to a file of its own."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "replica"


# -- the writer ------------------------------------------------------------------------------


class Checkpointer:
    """Signs the audit head and appends it to this replica's checkpoint file.

    ``run_once()`` is one checkpoint (the periodic task and the tests call it). A head that has
    not moved since this process last wrote it is not written again.

    Only a head that extends the last signed one is signed: the head's seq is not below it, and
    the event at its seq still has the hash it was signed with. Otherwise the chain was rolled
    back (and perhaps written on since), and signing the new head would make the rollback look
    anchored: the checkpoint is refused (``audit.checkpoint_refused``, logged as an error every
    time it is tried) and the last signed one stays the reference. The first ``run_once`` takes
    the last signed checkpoint from the directory, so a restart forgets nothing. Checkpoints of
    ``previous_keys`` (retired by a rotation) count as signed.
    """

    def __init__(
        self,
        engine: Engine,
        key: Ed25519PrivateKey,
        directory: Path,
        replica: str,
        clock: Callable[[], datetime] = utcnow,
        *,
        previous_keys: Sequence[Ed25519PublicKey] = (),
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        """``on_refused`` is told of every refusal to sign (a rolled-back chain): a metric."""
        self._engine = engine
        self._on_refused = on_refused
        self._key = key
        self.directory = directory
        self.path = directory / f"{replica}{SUFFIX}"
        self._replica = replica
        self._clock = clock
        self._last: tuple[int, str] | None = None
        self._seeded = False
        self._lock = threading.Lock()
        self.public_key = key.public_key()
        self._trusted = trusted((self.public_key, *previous_keys))

    def _head(self) -> tuple[int, str]:
        with self._engine.connect() as conn:
            seq, head_hash = conn.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
            conn.rollback()
        return int(seq), str(head_hash)

    def _append(self, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # Replicas that share a volume and host name share the file: one write per line,
            # under an advisory lock, never interleaves.
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size:
                with self.path.open("rb") as existing:
                    existing.seek(size - 1)
                    if existing.read(1) != b"\n":
                        data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _regression(self, head_seq: int) -> str | None:
        """Why the head does not extend the last signed checkpoint, or None when it does."""
        if self._last is None:
            return None
        signed_seq, signed_hash = self._last
        if head_seq < signed_seq:
            return "head below the last signed checkpoint"
        if signed_seq == 0:
            return None
        with self._engine.connect() as conn:
            stored = conn.scalar(select(AuditEvent.hash).where(AuditEvent.seq == signed_seq))
            conn.rollback()
        if stored != signed_hash:
            return "event at the last signed checkpoint no longer has the signed hash"
        return None

    def run_once(self) -> Checkpoint | None:
        """Checkpoint the current head; returns it, or None when it was already written or was
        refused (the head does not extend the last signed checkpoint)."""
        with self._lock:
            if not self._seeded:
                seed = latest_signed(self.directory, self._trusted)
                self._last = (seed.seq, seed.hash) if seed is not None else None
                self._seeded = True
            seq, head_hash = self._head()
            if self._last == (seq, head_hash):
                return None
            regression = self._regression(seq)
            if regression is not None:
                log.error(
                    "audit checkpoint refused: the chain was rolled back",
                    extra={
                        "event": "audit.checkpoint_refused",
                        "reason": regression,
                        "signed_seq": self._last[0] if self._last is not None else None,
                        "head_seq": seq,
                    },
                )
                if self._on_refused is not None:
                    self._on_refused()
                return None
            checkpoint = sign(self._key, seq, head_hash, self._clock(), self._replica)
            self._append(checkpoint.line())
            self._last = (seq, head_hash)
        log.info(
            "audit checkpoint",
            extra={
                "event": "audit.checkpoint",
                "seq": checkpoint.seq,
                "hash": checkpoint.hash,
                "signature": checkpoint.signature,
                "key_id": checkpoint.key_id,
                "replica": checkpoint.replica,
            },
        )
        return checkpoint

    async def checkpoint(self) -> None:
        """One checkpoint off the event loop; a failure is logged, not raised (the next try may work)."""
        try:
            await asyncio.to_thread(self.run_once)
        except (SQLAlchemyError, OSError) as exc:
            log.warning(
                "audit checkpoint failed",
                extra={"event": "audit.checkpoint_failed", "exc_type": type(exc).__name__},
            )

    async def run(self, interval_s: float) -> None:
        """Checkpoint now, then every ``interval_s``, until cancelled (a database that is not
        reachable at start delays nothing but the first checkpoint)."""
        while True:
            await self.checkpoint()
            await asyncio.sleep(interval_s)
