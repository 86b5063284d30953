"""The release manifest of one model version, and its detached Ed25519 signature.

A version's answer depends on more than its ONNX bytes: the thresholds and operating points
turn probabilities into decisions, the preprocessing (unit factors, imputation values,
allow-lists, windowing) decides what the graph sees, and the ``[versions.N.ood]`` section decides
when no decision is made at all. Signing the ONNX file alone let anyone who can edit
``model.toml`` change results under a valid signature. The release signature therefore covers a
*manifest*: the ONNX sha256 plus every result-affecting declaration of that version, as
canonical JSON (sorted keys, no whitespace, ASCII). The signed bytes are
``MANIFEST_DOMAIN + canonical JSON``, so a signature made for another purpose with the same key
never verifies as a release.

What the manifest holds (``model.toml`` fields): ``name``, ``task``, ``not_for_clinical_use`` and
``intended_use`` (the production gate reads them), ``labels``, ``positive_label``, ``inputs``,
``outputs``, ``thresholds`` (operating points included), ``preprocessing`` (all of it), and the
version's own ``[versions.N]`` entry (sha256, ``ood`` included). Left out, so an operator may tune
them without a new release: ``description``, ``card``, ``batching``, ``runtime`` and
``version_policy``, and the other versions' entries. Values equal to the schema's defaults are
left out as well, so a field the schema gains later does not invalidate existing releases.

The signature lives in ``<model>/<version>/release.sig`` (raw 64-byte Ed25519). A
``model.onnx.sig`` from before (over the ONNX bytes only) is not accepted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.errors import ModelIntegrityError, ModelSignatureError
from app.inference.spec import ModelSpec, load_spec

#: Identifies the manifest layout; part of the signed bytes.
MANIFEST_FORMAT: Final = "medinfer.release/1"
#: Prefix of the signed message (domain separation).
MANIFEST_DOMAIN: Final = b"medinfer release manifest\n"
SIGNATURE_NAME: Final = "release.sig"
LEGACY_SIGNATURE_NAME: Final = "model.onnx.sig"
ONNX_NAME: Final = "model.onnx"

_SPEC_FIELDS: Final = (
    "name",
    "task",
    "not_for_clinical_use",
    "intended_use",
    "labels",
    "positive_label",
    "inputs",
    "outputs",
    "thresholds",
    "preprocessing",
)


def manifest(spec: ModelSpec, version: str, onnx_sha256: str) -> dict[str, Any]:
    """The result-affecting declarations of ``version``, keyed as in ``model.toml``."""
    declared = spec.model_dump(mode="json", include=set(_SPEC_FIELDS), exclude_defaults=True)
    # The gate's inputs are signed even where they equal a default.
    declared["name"] = spec.name
    declared["not_for_clinical_use"] = spec.not_for_clinical_use
    return {
        "format": MANIFEST_FORMAT,
        "onnx_sha256": onnx_sha256,
        "version": version,
        "model": declared,
        "version_entry": spec.versions[version].model_dump(mode="json", exclude_defaults=True),
    }


def canonical(document: dict[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, ASCII only (floats as Python's shortest repr)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def signed_message(spec: ModelSpec, version: str, onnx_sha256: str) -> bytes:
    """The exact bytes a release signature covers."""
    return MANIFEST_DOMAIN + canonical(manifest(spec, version, onnx_sha256))


def verify_release(
    spec: ModelSpec, version_dir: Path, onnx_sha256: str, trusted_key: Ed25519PublicKey, label: str
) -> None:
    """Check ``release.sig`` against the manifest of this spec and these ONNX bytes.

    Raises :class:`ModelSignatureError` if the signature is missing, was made over the ONNX file
    alone (an old ``model.onnx.sig``), or does not verify: then the model file or a
    result-affecting line of ``model.toml`` changed since the release was signed.
    """
    path = version_dir / SIGNATURE_NAME
    try:
        signature = path.read_bytes()
    except FileNotFoundError as exc:
        legacy = (
            " (model.onnx.sig signs the ONNX file only and is no longer accepted)"
            if (version_dir / LEGACY_SIGNATURE_NAME).is_file()
            else ""
        )
        raise ModelSignatureError(
            f"{label}: {SIGNATURE_NAME} is missing and a signing key is configured{legacy}; "
            "sign the release with `medinfer models sign`"
        ) from exc
    try:
        trusted_key.verify(signature, signed_message(spec, version_dir.name, onnx_sha256))
    except InvalidSignature as exc:
        raise ModelSignatureError(
            f"{label}: the release signature does not verify against the trusted key for this model file and "
            "model.toml (a threshold, unit factor, imputation value, allow-list or OOD setting may have "
            "changed since signing); version refused"
        ) from exc


def sign_release(private_key_path: Path, model_file: Path) -> Path:
    """Sign the release of ``<repo>/<model>/<version>/model.onnx``; write and return ``release.sig``.

    The file must match the sha256 pinned for its version in ``model.toml`` (raises
    :class:`ModelIntegrityError` otherwise): a release signs what the registry will load.
    """
    key = serialization.load_pem_private_key(private_key_path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        msg = f"{private_key_path}: not an Ed25519 private key"
        raise TypeError(msg)
    version_dir = model_file.resolve().parent
    spec = load_spec(version_dir.parent)
    version = version_dir.name
    if version not in spec.versions:
        raise ModelIntegrityError(f"{spec.name}: model.toml declares no version {version!r}")
    actual = hashlib.sha256((version_dir / ONNX_NAME).read_bytes()).hexdigest()
    if actual != spec.versions[version].sha256:
        raise ModelIntegrityError(
            f"{spec.name} v{version}: {ONNX_NAME} does not match the sha256 pinned in model.toml; not signed"
        )
    path = version_dir / SIGNATURE_NAME
    path.write_bytes(key.sign(signed_message(spec, version, actual)))
    return path
