"""Ed25519 release signatures: over the version's release manifest (the ONNX sha256 and the
result-affecting declarations of model.toml), checked before ONNX Runtime reads the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.__main__ import main as cli
from app.domain import VersionState
from app.errors import ModelIntegrityError, ModelSignatureError
from app.inference.registry import ModelRegistry
from app.inference.release import MANIFEST_DOMAIN, canonical, manifest, sign_release, signed_message
from app.inference.spec import load_spec
from app.security.keys import load_ed25519_public_key
from tests.conftest import REPO_ROOT
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


def _status(repo: Path, public: Path) -> dict[str, tuple[VersionState, str | None, str]]:
    registry = ModelRegistry(repo, load_ed25519_public_key(public))
    registry.load_all()
    return {s.model: (s.state, s.error_code, s.error or "") for s in registry.statuses()}


def test_unsigned_model_is_refused_when_a_key_is_trusted(tmp_path: Path) -> None:
    _, public = _keypair(tmp_path, "release")
    write_model(tmp_path / "repo", "alpha", {"1": 1})
    state, code, error = _status(tmp_path / "repo", public)["alpha"]
    assert state is VersionState.FAILED
    assert code == ModelSignatureError.code
    assert "release.sig is missing" in error


def test_signed_release_serves_and_a_foreign_signature_is_refused(tmp_path: Path) -> None:
    private, public = _keypair(tmp_path, "release")
    other, _ = _keypair(tmp_path, "other")
    alpha = write_model(tmp_path / "repo", "alpha", {"1": 1})
    beta = write_model(tmp_path / "repo", "beta", {"1": 2})
    assert sign_release(private, alpha / "1" / "model.onnx") == alpha / "1" / "release.sig"
    sign_release(other, beta / "1" / "model.onnx")
    by_model = _status(tmp_path / "repo", public)
    assert by_model["alpha"][0] is VersionState.READY
    assert by_model["beta"][0] is VersionState.FAILED
    assert "does not verify" in by_model["beta"][2]


def test_a_signature_over_the_onnx_bytes_alone_is_no_longer_a_release(tmp_path: Path) -> None:
    """The old scheme (model.onnx.sig over the file's bytes) is refused, and the message says so."""
    private, public = _keypair(tmp_path, "release")
    alpha = write_model(tmp_path / "repo", "alpha", {"1": 1})
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    onnx_bytes = (alpha / "1" / "model.onnx").read_bytes()
    (alpha / "1" / "model.onnx.sig").write_bytes(key.sign(onnx_bytes))
    state, code, error = _status(tmp_path / "repo", public)["alpha"]
    assert (state, code) == (VersionState.FAILED, ModelSignatureError.code)
    assert "model.onnx.sig signs the ONNX file only" in error
    # The same bytes renamed to release.sig do not verify either: the manifest is what is signed.
    (alpha / "1" / "model.onnx.sig").rename(alpha / "1" / "release.sig")
    assert "does not verify" in _status(tmp_path / "repo", public)["alpha"][2]


def _release(tmp_path: Path, model: str) -> tuple[Path, Path, Path]:
    """A real reference model, copied and its served version signed: repository, key, model.toml."""
    private, public = _keypair(tmp_path, "release")
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "models" / model, repo / model)
    version = max((p for p in (repo / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    sign_release(private, version / "model.onnx")
    return repo, public, repo / model / "model.toml"


def _cxr_release(tmp_path: Path) -> tuple[Path, Path, Path]:
    return _release(tmp_path, "cxr-pneumonia")


def _ehr_release(tmp_path: Path) -> tuple[Path, Path, Path]:
    return _release(tmp_path, "ehr-heart-disease")


def test_a_changed_threshold_with_the_old_signature_is_refused(tmp_path: Path) -> None:
    repo, public, toml = _cxr_release(tmp_path)
    assert _status(repo, public)["cxr-pneumonia"][0] is VersionState.READY
    text = toml.read_text(encoding="utf-8")
    assert "\n[thresholds]\ndefault = " in text
    head, _, tail = text.partition("\n[thresholds]\ndefault = ")
    toml.write_text(head + "\n[thresholds]\ndefault = 0.01" + tail[tail.index("\n") :], encoding="utf-8")
    state, code, error = _status(repo, public)["cxr-pneumonia"]
    assert (state, code) == (VersionState.FAILED, ModelSignatureError.code)
    assert "threshold" in error


def test_a_changed_imputation_value_with_the_old_signature_is_refused(tmp_path: Path) -> None:
    repo, public, toml = _ehr_release(tmp_path)
    assert _status(repo, public)["ehr-heart-disease"][0] is VersionState.READY
    text = toml.read_text(encoding="utf-8")
    assert "thalach = 143.0" in text
    toml.write_text(text.replace("thalach = 143.0", "thalach = 190.0", 1), encoding="utf-8")
    assert _status(repo, public)["ehr-heart-disease"][:2] == (VersionState.FAILED, ModelSignatureError.code)


def test_flipping_not_for_clinical_use_breaks_the_signature(tmp_path: Path) -> None:
    """The production gate reads this flag: an edit that would slip a demo model past it is refused."""
    repo, public, toml = _cxr_release(tmp_path)
    text = toml.read_text(encoding="utf-8")
    toml.write_text(text.replace("not_for_clinical_use = true", "not_for_clinical_use = false"), encoding="utf-8")
    assert _status(repo, public)["cxr-pneumonia"][:2] == (VersionState.FAILED, ModelSignatureError.code)


def test_batching_and_runtime_may_be_tuned_without_a_new_release(tmp_path: Path) -> None:
    repo, public, toml = _cxr_release(tmp_path)
    text = toml.read_text(encoding="utf-8")
    assert "max_queue_delay_ms = 5.0" in text
    toml.write_text(text.replace("max_queue_delay_ms = 5.0", "max_queue_delay_ms = 9.0"), encoding="utf-8")
    assert _status(repo, public)["cxr-pneumonia"][0] is VersionState.READY


def test_the_manifest_is_canonical_json_of_the_result_affecting_declarations(tmp_path: Path) -> None:
    repo, _, _ = _ehr_release(tmp_path)
    spec = load_spec(repo / "ehr-heart-disease")
    version = max(spec.versions, key=int)
    onnx_sha = hashlib.sha256((repo / "ehr-heart-disease" / version / "model.onnx").read_bytes()).hexdigest()
    document = manifest(spec, version, onnx_sha)
    encoded = canonical(document)
    assert json.loads(encoded) == document
    assert encoded == json.dumps(json.loads(encoded), sort_keys=True, separators=(",", ":")).encode()
    assert signed_message(spec, version, onnx_sha) == MANIFEST_DOMAIN + encoded
    assert document["onnx_sha256"] == onnx_sha == spec.versions[version].sha256
    declared = document["model"]
    assert spec.thresholds is not None
    assert declared["thresholds"]["default"] == spec.thresholds.default
    assert declared["preprocessing"]["imputation"]["thalach"] == spec.preprocessing["imputation"]["thalach"]
    assert declared["not_for_clinical_use"] is True
    assert {"batching", "runtime", "version_policy", "description", "card"}.isdisjoint(declared)
    assert document["version_entry"]["sha256"] == onnx_sha


def test_signing_a_file_that_differs_from_the_pinned_sha256_is_refused(tmp_path: Path) -> None:
    private, _ = _keypair(tmp_path, "release")
    alpha = write_model(tmp_path / "repo", "alpha", {"1": 1})
    (alpha / "1" / "model.onnx").write_bytes(b"not the pinned model")
    with pytest.raises(ModelIntegrityError):
        sign_release(private, alpha / "1" / "model.onnx")
    assert not (alpha / "1" / "release.sig").exists()


def test_cli_signs_and_validates_with_the_trusted_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = _keypair(tmp_path, "release")
    alpha = write_model(tmp_path / "repo", "alpha", {"1": 1})
    monkeypatch.setenv("MEDINFER_MODEL_SIGNING_PUBLIC_KEY", str(public))
    assert cli(["models", "validate", "--repository", str(tmp_path / "repo")]) == 1
    assert "[model-signature]" in capsys.readouterr().out
    assert cli(["models", "sign", "--private-key", str(private), str(alpha / "1" / "model.onnx")]) == 0
    assert "release.sig" in capsys.readouterr().out
    assert cli(["models", "validate", "--repository", str(tmp_path / "repo")]) == 0
    assert "ok   alpha v1" in capsys.readouterr().out
    toml = alpha / "model.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("default = 0.5", "default = 0.2"), encoding="utf-8")
    assert cli(["models", "validate", "--repository", str(tmp_path / "repo")]) == 1
    assert "[model-signature]" in capsys.readouterr().out


def test_validate_with_production_settings_reports_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_model(tmp_path / "repo", "alpha", {"1": 1})  # not_for_clinical_use = true
    monkeypatch.setenv("MEDINFER_ENV", "production")
    for name in ("AUDIT_HMAC_KEY", "PSEUDONYM_KEY", "KEY_ENCRYPTION_KEY"):
        monkeypatch.setenv(f"MEDINFER_{name}", "a-real-secret-of-at-least-forty-characters-long")
    assert cli(["models", "validate", "--repository", str(tmp_path / "repo")]) == 1
    out = capsys.readouterr().out
    assert "REFUSED alpha v1: [model-not-acknowledged]" in out
    assert "alpha@1" in out
    monkeypatch.setenv("MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS", '["alpha@1"]')
    assert cli(["models", "validate", "--repository", str(tmp_path / "repo")]) == 0
    assert "results never sent to a PACS" in capsys.readouterr().out
