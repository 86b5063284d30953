"""Signed audit checkpoints: signing, the append-only files, refusing what does not verify, keys
retired by a rotation, and the rollback rule of the chain verifier (pure functions; no database)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.audit.chain import CHAINED, GENESIS, Verification, canonical, head_mac, link_hash, mac, verify
from app.audit.checkpoint import (
    SUFFIX,
    key_id,
    latest_signed,
    load_signing_key,
    load_verify_key,
    load_verify_keys,
    parse_verified,
    previous_keys_dir,
    public_key_path,
    read_anchor,
    sign,
)
from app.config import Settings
from app.errors import AuditUnavailableError

MOMENT = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
KEY = b"k" * 32


def _write(directory: Path, name: str, *lines: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{name}{SUFFIX}").open("ab") as handle:
        for line in lines:
            handle.write(line)


def test_a_checkpoint_verifies_only_under_its_key_and_unaltered() -> None:
    private = Ed25519PrivateKey.generate()
    checkpoint = sign(private, 42, "a" * 64, MOMENT, "medinfer-0")
    assert parse_verified(checkpoint.line(), private.public_key()) == checkpoint
    assert parse_verified(checkpoint.line(), Ed25519PrivateKey.generate().public_key()) is None
    fields = json.loads(checkpoint.line())
    for name, value in (("seq", 43), ("hash", "b" * 64), ("time", "2027-01-01T00:00:00.000000Z"), ("replica", "x")):
        forged = json.dumps(fields | {name: value}).encode()
        assert parse_verified(forged, private.public_key()) is None, name
    for junk in (b"", b"not json", b"[]", b'{"seq": 1}', json.dumps(fields | {"seq": "42"}).encode()):
        assert parse_verified(junk, private.public_key()) is None


def test_the_latest_valid_checkpoint_of_all_files_is_the_anchor(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    directory = tmp_path / "checkpoints"
    _write(directory, "medinfer-0", sign(private, 10, "a" * 64, MOMENT, "medinfer-0").line())
    _write(directory, "medinfer-1", sign(private, 25, "b" * 64, MOMENT, "medinfer-1").line())
    _write(directory, "medinfer-1", sign(private, 17, "c" * 64, MOMENT, "medinfer-1").line())
    anchor = read_anchor(directory, private.public_key())
    assert anchor.latest is not None
    assert (anchor.latest.seq, anchor.latest.hash) == (25, "b" * 64)
    assert (anchor.checkpoints, anchor.refused) == (3, 0)


def test_a_forged_checkpoint_is_refused_not_trusted(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    directory = tmp_path / "checkpoints"
    genuine = sign(private, 10, "a" * 64, MOMENT, "medinfer-0")
    # Claims a later head, signed with another key under our key id: a false alarm it must not raise.
    forged = sign(Ed25519PrivateKey.generate(), 99, "f" * 64, MOMENT, "medinfer-0")
    forged_fields = json.loads(forged.line()) | {"key_id": genuine.key_id}
    _write(directory, "medinfer-0", genuine.line(), json.dumps(forged_fields).encode() + b"\n")
    anchor = read_anchor(directory, private.public_key())
    assert anchor.latest == genuine
    assert anchor.refused == 1
    assert anchor.first_refused == f"medinfer-0{SUFFIX}:2"


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    directory = tmp_path / "checkpoints"
    line = sign(private, 10, "a" * 64, MOMENT, "medinfer-0").line()
    _write(directory, "medinfer-0", line, line[:30])
    anchor = read_anchor(directory, private.public_key())
    assert (anchor.checkpoints, anchor.refused) == (1, 0)


def test_without_a_key_every_checkpoint_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    _write(directory, "r", sign(Ed25519PrivateKey.generate(), 1, "a" * 64, MOMENT, "r").line())
    anchor = read_anchor(directory, None)
    assert (anchor.latest, anchor.refused) == (None, 1)
    assert read_anchor(tmp_path / "absent", None) == read_anchor(tmp_path / "absent", None)


def test_outside_production_a_missing_key_is_generated_with_its_public_half(tmp_path: Path) -> None:
    settings = Settings(env="test", data_dir=tmp_path)
    key = load_signing_key(settings)
    path = settings.resolved_checkpoint_key
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_signing_key(settings).public_key() == key.public_key()  # loaded, not made again
    verify_key = load_verify_key(settings)
    assert verify_key == key.public_key()
    # A verifier that holds only the public key.
    path.unlink()
    assert load_verify_key(settings) == key.public_key()
    public_only = Settings(env="test", data_dir=tmp_path, audit_checkpoint_key=public_key_path(path))
    assert load_verify_key(public_only) == key.public_key()


def test_production_refuses_to_start_without_a_checkpoint_key(tmp_path: Path) -> None:
    secret = "s" * 40
    settings = Settings(
        env="production", data_dir=tmp_path, audit_hmac_key=secret, pseudonym_key=secret, key_encryption_key=secret
    )
    with pytest.raises(AuditUnavailableError, match="MEDINFER_AUDIT_CHECKPOINT_KEY"):
        load_signing_key(settings)
    assert not settings.resolved_checkpoint_key.exists()
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    settings.resolved_checkpoint_key.parent.mkdir(parents=True)
    settings.resolved_checkpoint_key.write_bytes(pem)
    assert isinstance(load_signing_key(settings), Ed25519PrivateKey)


@dataclass
class Row:
    seq: int
    occurred_at: datetime
    prev_hash: str
    hash: str
    mac: str
    request_id: str | None = None
    action: str = "inference"
    outcome: str = "success"
    actor: str | None = None
    source_ip: str | None = None
    model: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None
    patient_pseudonym: str | None = None
    study_pseudonym: str | None = None
    detail: str = "{}"


def _chain(n: int, salt: str = "") -> list[Row]:
    rows, prev = [], GENESIS
    for seq in range(1, n + 1):
        row = Row(seq=seq, occurred_at=MOMENT, prev_hash=prev, hash="", mac="", request_id=f"{salt}{seq}")
        row.hash = link_hash(prev, canonical({name: getattr(row, name) for name in CHAINED}))
        row.mac = mac(KEY, row.hash)
        rows.append(row)
        prev = row.hash
    return rows


def _verify(rows: list[Row], *checkpoints: tuple[int, str]) -> Verification:
    head = rows[-1]
    signed = {seq: bytes.fromhex(digest) for seq, digest in checkpoints}
    return verify(rows, head.seq, head.hash, head_mac(KEY, head.seq, head.hash), KEY, checkpoints=signed)


def _append(rows: list[Row], n: int, salt: str) -> list[Row]:
    """``rows`` and ``n`` more events chained after them (what the service writes after a rollback)."""
    extra = _chain(len(rows) + n, salt=salt)[len(rows) :]
    prev = rows[-1].hash
    for row in extra:
        row.prev_hash = prev
        row.hash = link_hash(prev, canonical({name: getattr(row, name) for name in CHAINED}))
        row.mac = mac(KEY, row.hash)
        prev = row.hash
    return rows + extra


def test_a_chain_that_no_longer_holds_the_checkpointed_head_was_rolled_back() -> None:
    original = _chain(8)
    assert _verify(original, (8, original[7].hash)).valid
    assert _verify(original, (5, original[4].hash)).valid
    # Cut back to 5 events: self-consistent, head and MAC included, but the checkpoint says 8.
    cut = original[:5]
    result = _verify(cut, (8, original[7].hash))
    assert result.valid is False
    assert result.reason is not None
    assert result.reason.startswith("rollback")
    assert "seq 8" in result.reason
    assert result.checkpoint_seq == 8
    # Cut back to 5, then 3 different events written after: as long as before, other hashes.
    rewritten = _append(cut, 3, salt="x")
    assert _verify(rewritten).valid
    result = _verify(rewritten, (8, original[7].hash))
    assert result.valid is False
    assert result.reason is not None
    assert result.reason.startswith("rollback")


def test_a_rollback_written_past_is_caught_by_the_older_checkpoint() -> None:
    """Review finding: checkpoint (8, H8); roll back to 5; the service writes 6..10 anew and
    signs (10, H'10). The latest checkpoint matches the chain; the one at 8 does not."""
    original = _chain(8)
    rewritten = _append(original[:5], 5, salt="x")
    result = _verify(rewritten, (8, original[7].hash), (10, rewritten[9].hash))
    assert result.valid is False
    assert result.reason == "rollback: event 8 does not have the hash of the signed checkpoint at seq 8"
    assert (result.first_broken_seq, result.checkpoint_seq) == (8, 8)
    # Every checkpoint of the chain as it is: valid, checked against the latest.
    result = _verify(rewritten, (3, rewritten[2].hash), (8, rewritten[7].hash), (10, rewritten[9].hash))
    assert (result.valid, result.checkpoint_seq) == (True, 10)


def test_every_checkpoint_of_every_file_is_kept_and_a_conflict_is_named(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    directory = tmp_path / "checkpoints"
    _write(directory, "medinfer-0", *(sign(private, s, f"{s:064x}", MOMENT, "medinfer-0").line() for s in (3, 8)))
    _write(directory, "medinfer-1", sign(private, 10, "a" * 64, MOMENT, "medinfer-1").line())
    anchor = read_anchor(directory, private.public_key())
    assert dict(anchor.signed) == {3: bytes.fromhex(f"{3:064x}"), 8: bytes.fromhex(f"{8:064x}"), 10: b"\xaa" * 32}
    assert anchor.conflict is None
    # A service before the fix signed the rewritten head at a seq it had signed before.
    _write(directory, "medinfer-1", sign(private, 8, "b" * 64, MOMENT, "medinfer-1").line())
    assert read_anchor(directory, private.public_key()).conflict == 8


def test_checkpoints_of_a_retired_key_stay_trusted_through_the_previous_directory(tmp_path: Path) -> None:
    settings = Settings(env="test", data_dir=tmp_path)
    old = load_signing_key(settings)
    directory = tmp_path / "checkpoints"
    _write(directory, "r", sign(old, 5, "a" * 64, MOMENT, "r").line())
    # The rotation, as docs/operations.md describes it.
    key_path = settings.resolved_checkpoint_key
    previous = previous_keys_dir(key_path)
    previous.mkdir()
    public_key_path(key_path).rename(previous / "2026-12.pub")
    key_path.unlink()
    new = load_signing_key(settings)
    _write(directory, "r", sign(new, 9, "b" * 64, MOMENT, "r").line())

    assert read_anchor(directory, load_verify_key(settings)).refused == 1, "the current key alone refuses the old line"
    keys = load_verify_keys(settings)
    assert keys == (new.public_key(), old.public_key())
    anchor = read_anchor(directory, keys)
    assert (anchor.checkpoints, anchor.refused, sorted(anchor.signed)) == (2, 0, [5, 9])
    # A key that is not one is not silently skipped.
    (previous / "junk.pub").write_text("not a key")
    with pytest.raises(AuditUnavailableError, match=r"junk\.pub"):
        load_verify_keys(settings)


def test_the_last_signed_checkpoint_is_found_without_trusting_forged_lines(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    keys = {key_id(private.public_key()): private.public_key()}
    directory = tmp_path / "checkpoints"
    assert latest_signed(directory, keys) is None
    genuine = [sign(private, s, f"{s:064x}", MOMENT, "r") for s in range(1, 30)]
    _write(directory, "r", *(c.line() for c in genuine))
    assert latest_signed(directory, keys) == genuine[-1]
    # More forged lines with higher seqs than there are candidates: the genuine one is still found.
    forged = [json.loads(sign(Ed25519PrivateKey.generate(), s, "f" * 64, MOMENT, "x").line()) for s in range(90, 110)]
    _write(directory, "x", *(json.dumps(f | {"key_id": genuine[0].key_id}).encode() + b"\n" for f in forged))
    assert latest_signed(directory, keys) == genuine[-1]
