"""The hash chain: canonical serialisation, link hashes, MACs and verification. Pure functions.

``hash_n = SHA-256(hash_{n-1} || canonical(event_n))`` and ``mac_n = HMAC-SHA256(key, hash_n)``.
Someone with write access to the database but not the key can delete or alter rows, but cannot
produce MACs that verify, and ``seq`` numbers are gap-free, so :func:`verify` names the first
link that breaks. The head row's MAC over ``(seq, hash)`` reveals events cut from the end.
A rollback (events cut from the end and an older head row put back, and perhaps new events
written after it) is caught only by anchors kept outside the database: signed checkpoints of
earlier heads (:mod:`app.audit.checkpoint`), every one of which ``verify`` checks the chain
against.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

GENESIS = "0" * 64

#: The columns covered by the link hash, in the order they are listed in the canonical form.
CHAINED = (
    "seq",
    "occurred_at",
    "request_id",
    "action",
    "outcome",
    "actor",
    "source_ip",
    "model",
    "model_version",
    "model_sha256",
    "input_sha256",
    "output_sha256",
    "patient_pseudonym",
    "study_pseudonym",
    "detail",
)


class ChainRow(Protocol):
    seq: int
    occurred_at: datetime
    prev_hash: str
    hash: str
    mac: str


def utc_text(moment: datetime) -> str:
    """One spelling of a timestamp, whatever the database hands back (SQLite drops the zone)."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(fields: Mapping[str, Any]) -> bytes:
    values = {name: fields[name] for name in CHAINED}
    values["occurred_at"] = utc_text(values["occurred_at"])
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


def mac(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode("ascii"), hashlib.sha256).hexdigest()


def head_mac(key: bytes, seq: int, head_hash: str) -> str:
    return mac(key, f"head:{seq}:{head_hash}")


@dataclass(frozen=True, slots=True)
class Verification:
    valid: bool
    events: int
    head_seq: int
    head_hash: str
    first_broken_seq: int | None = None
    reason: str | None = None
    checkpoint_seq: int | None = None


def _row_problem(row: ChainRow, expected_seq: int, expected_prev: str, key: bytes) -> str | None:
    if row.seq != expected_seq:
        return f"event {expected_seq} is missing (next present is {row.seq})"
    if row.prev_hash != expected_prev:
        return "prev_hash does not match the previous event's hash (reordered or replaced)"
    if link_hash(row.prev_hash, canonical({name: getattr(row, name) for name in CHAINED})) != row.hash:
        return "content does not match its hash (altered)"
    if not hmac.compare_digest(mac(key, row.hash), row.mac):
        return "MAC does not verify (rewritten without the server key)"
    return None


def _rollback_at(seq: int) -> str:
    return f"rollback: event {seq} does not have the hash of the signed checkpoint at seq {seq}"


def verify(
    rows: Iterable[ChainRow],
    head_seq: int,
    head_hash: str,
    head_mac_value: str | None,
    key: bytes,
    *,
    checkpoints: Mapping[int, bytes] | None = None,
) -> Verification:
    """Walk the chain in ``seq`` order; stop at the first broken link and say why.

    ``checkpoints`` maps the seq of every trusted checkpoint to the hash it signed (raw digest):
    a chain that no longer holds each of those events with that hash was rolled back, however
    consistent it is otherwise. Every one is checked, not only the latest: after a rollback new
    events are written past the old head, and a checkpoint of the rewritten head is genuine too.
    ``rows`` is consumed once, so it may stream: nothing but the current row is kept.
    """
    signed = checkpoints or {}
    latest = max(signed, default=None)
    expected_prev = GENESIS
    count = 0
    for row in rows:
        problem = _row_problem(row, count + 1, expected_prev, key)
        if problem is not None:
            return Verification(
                valid=False,
                events=count,
                head_seq=head_seq,
                head_hash=head_hash,
                first_broken_seq=count + 1 if problem.startswith("event ") else row.seq,
                reason=problem,
            )
        expected_prev = row.hash
        count += 1
        anchored = signed.get(row.seq)
        if anchored is not None and anchored != bytes.fromhex(row.hash):
            return Verification(
                valid=False,
                events=count,
                head_seq=head_seq,
                head_hash=head_hash,
                first_broken_seq=row.seq,
                reason=_rollback_at(row.seq),
                checkpoint_seq=row.seq,
            )
    problem, at = None, None
    if head_seq != count or head_hash != expected_prev:
        problem, at = f"head says {head_seq} events but the chain holds {count} (truncated)", count + 1
    elif head_seq > 0 and (
        head_mac_value is None or not hmac.compare_digest(head_mac(key, head_seq, head_hash), head_mac_value)
    ):
        problem, at = "head MAC does not verify", head_seq
    elif latest is not None and latest > count:
        problem, at = f"rollback: the signed checkpoint at seq {latest} is past the chain's {count} events", count + 1
    return Verification(
        valid=problem is None,
        events=count,
        head_seq=head_seq,
        head_hash=head_hash,
        first_broken_seq=at,
        reason=problem,
        checkpoint_seq=latest,
    )


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """Keyed HMAC pseudonym: stable for the same identifier, meaningless without the key."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)
