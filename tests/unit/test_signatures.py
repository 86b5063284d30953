"""Detached Ed25519 signatures on model files, checked before ONNX Runtime reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.__main__ import main as cli
from app.domain import VersionState
from app.errors import ModelSignatureError
from app.inference.registry import ModelRegistry
from app.security.keys import load_ed25519_public_key, sign_file
from tests.support.models import write_model


def _keypair(directory: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def test_unsigned_model_is_refused_when_a_key_is_trusted(tmp_path: Path) -> None:
    _, public = _keypair(tmp_path, "release")
    write_model(tmp_path / "repo", "alpha", {"1": 1})
    registry = ModelRegistry(tmp_path / "repo", load_ed25519_public_key(public))
    registry.load_all()
    (status,) = registry.statuses()
    assert status.state is VersionState.FAILED
    assert status.error_code == ModelSignatureError.code
    assert "model.onnx.sig is missing" in (status.error or "")


def test_signed_model_serves_and_a_foreign_signature_is_refused(tmp_path: Path) -> None:
    private, public = _keypair(tmp_path, "release")
    other, _ = _keypair(tmp_path, "other")
    alpha = write_model(tmp_path / "repo", "alpha", {"1": 1})
    beta = write_model(tmp_path / "repo", "beta", {"1": 2})
    sign_file(private, alpha / "1" / "model.onnx")
    sign_file(other, beta / "1" / "model.onnx")
    registry = ModelRegistry(tmp_path / "repo", load_ed25519_public_key(public))
    registry.load_all()
    by_model = {s.model: s for s in registry.statuses()}
    assert by_model["alpha"].state is VersionState.READY
    assert by_model["beta"].state is VersionState.FAILED
    assert "does not verify" in (by_model["beta"].error or "")


def test_cli_signs_and_validates_with_the_trusted_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = _keypair(tmp_path, "release")
    alpha = write_model(tmp_path / "repo", "alpha", {"1": 1})
    monkeypatch.setenv("MEDINFER_MODEL_SIGNING_PUBLIC_KEY", str(public))
    assert cli(["models", "validate", "--repository", str(tmp_path / "repo")]) == 1
    assert "[model-signature]" in capsys.readouterr().out
    assert cli(["models", "sign", "--private-key", str(private), str(alpha / "1" / "model.onnx")]) == 0
    assert cli(["models", "validate", "--repository", str(tmp_path / "repo")]) == 0
    assert "ok   alpha v1" in capsys.readouterr().out
