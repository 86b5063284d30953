"""The model registry: which versions serve, with integrity checks and atomic swaps.

Loading is blocking (hashing, ONNX Runtime session creation, warm-up); callers run it off the
event loop. A load builds the new versions completely beside the old ones and swaps one
reference under a lock, so a request that already holds a :class:`ServedVersion` finishes on it,
and a failed load leaves the old versions serving.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from app.domain import VersionState, VersionStatus
from app.errors import (
    MedinferError,
    ModelIntegrityError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelSignatureError,
)
from app.inference.session import LoadedSession, open_session
from app.inference.spec import ModelSpec, iter_model_dirs, load_spec

log = logging.getLogger(__name__)


SIGNATURE_SUFFIX = ".sig"


def verify_signature(data: bytes, signature_path: Path, trusted_key: Ed25519PublicKey, label: str) -> None:
    """Check a detached Ed25519 signature over the file's bytes.

    Raises :class:`ModelSignatureError` if the signature file is missing or does not verify.
    """
    try:
        signature = signature_path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelSignatureError(f"{label}: {signature_path.name} is missing and a signing key is configured") from exc
    try:
        trusted_key.verify(signature, data)
    except InvalidSignature as exc:
        raise ModelSignatureError(
            f"{label}: signature does not verify against the trusted key; version refused"
        ) from exc


@dataclass(frozen=True, slots=True)
class ServedVersion:
    """One loaded, warmed version: everything a request needs to run and to cite the model."""

    spec: ModelSpec
    version: str
    sha256: str
    loaded: LoadedSession


@dataclass(frozen=True, slots=True)
class _ModelEntry:
    spec: ModelSpec
    served: dict[str, ServedVersion]
    statuses: tuple[VersionStatus, ...]


def load_version(
    spec: ModelSpec, model_dir: Path, version: str, trusted_key: Ed25519PublicKey | None = None
) -> ServedVersion:
    """Verify one version's checksum (and signature, if a key is trusted), then open and warm it.

    The file is read once: the bytes that were checked are the bytes ONNX Runtime gets, so a
    file swapped on disk in between cannot slip through. Raises :class:`ModelIntegrityError`,
    :class:`ModelSignatureError`, or :class:`ModelLoadError` if the file is missing or will not run.
    """
    label = f"{spec.name} v{version}"
    path = model_dir / version / "model.onnx"
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{label}: {path.name} is missing") from exc
    expected = spec.versions[version].sha256
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelIntegrityError(
            f"{label}: sha256 {actual[:12]}... does not match the pinned {expected[:12]}...; version refused"
        )
    if trusted_key is not None:
        verify_signature(data, path.with_name(path.name + SIGNATURE_SUFFIX), trusted_key, label)
    loaded = open_session(spec, data)
    return ServedVersion(spec=spec, version=version, sha256=actual, loaded=loaded)


class ModelRegistry:
    """All models of one repository and the versions of each that serve now."""

    def __init__(self, repository: Path, trusted_key: Ed25519PublicKey | None = None) -> None:
        self._repository = repository
        self._trusted_key = trusted_key
        self._lock = threading.Lock()
        self._entries: dict[str, _ModelEntry] = {}
        self._failed_specs: dict[str, VersionStatus] = {}
        self._initial_load_done = threading.Event()

    @property
    def repository(self) -> Path:
        return self._repository

    @property
    def initial_load_done(self) -> bool:
        return self._initial_load_done.is_set()

    def load_all(self) -> None:
        """Load every model of the repository (blocking). Failures are recorded, not raised."""
        try:
            for model_dir in iter_model_dirs(self._repository):
                try:
                    self.load(model_dir.name)
                except MedinferError as exc:
                    log.exception(
                        "model failed to load",
                        extra={"event": "model.load_failed", "model": model_dir.name, "code": exc.code},
                    )
        finally:
            self._initial_load_done.set()

    def load(self, name: str) -> tuple[VersionStatus, ...]:
        """(Re)load ``name`` per its version policy, then swap atomically (blocking).

        Versions that fail keep their predecessor serving if one was; if none of the requested
        versions loads and nothing served before, the model stays unavailable. Raises
        :class:`ModelNotFoundError` if the folder is absent, or the first load error if no
        version could be loaded at all.
        """
        model_dir = self._repository / name
        if not (model_dir / "model.toml").is_file():
            raise ModelNotFoundError(f"model {name!r} is not in the repository")
        try:
            spec = load_spec(model_dir)
        except MedinferError as exc:
            with self._lock:
                self._failed_specs[name] = VersionStatus(
                    model=name,
                    version="-",
                    state=VersionState.FAILED,
                    sha256="",
                    error_code=exc.code,
                    error=exc.detail,
                )
            raise

        previous = self._entries.get(name)
        served: dict[str, ServedVersion] = {}
        statuses: list[VersionStatus] = []
        first_error: MedinferError | None = None
        for version in spec.served_versions():
            try:
                sv = load_version(spec, model_dir, version, self._trusted_key)
            except MedinferError as exc:
                first_error = first_error or exc
                log.exception(
                    "model version refused",
                    extra={"event": "model.version_refused", "model": name, "version": version, "code": exc.code},
                )
                kept = previous.served.get(version) if previous is not None else None
                if kept is not None:
                    # The build that served before keeps serving: the status says so (ready, its
                    # own sha256) and names the refused reload, so operators are not told that
                    # a version which answers requests has failed.
                    served[version] = kept
                    statuses.append(
                        VersionStatus(
                            model=name,
                            version=version,
                            state=VersionState.READY,
                            sha256=kept.sha256,
                            providers=kept.loaded.providers,
                            error_code=exc.code,
                            error=f"reload refused, the previous build keeps serving: {exc.detail}",
                        )
                    )
                    continue
                statuses.append(
                    VersionStatus(
                        model=name,
                        version=version,
                        state=VersionState.FAILED,
                        sha256=spec.versions[version].sha256,
                        error_code=exc.code,
                        error=exc.detail,
                    )
                )
                continue
            served[version] = sv
            statuses.append(
                VersionStatus(
                    model=name,
                    version=version,
                    state=VersionState.READY,
                    sha256=sv.sha256,
                    providers=sv.loaded.providers,
                )
            )
            log.info(
                "model version ready",
                extra={
                    "event": "model.version_ready",
                    "model": name,
                    "version": version,
                    "providers": list(sv.loaded.providers),
                },
            )

        if not served and previous is not None:
            # Nothing new loaded: what served before keeps serving, and the statuses say so.
            served = dict(previous.served)
            tried = {s.version for s in statuses}
            statuses[:0] = [s for s in previous.statuses if s.state is VersionState.READY and s.version not in tried]
        with self._lock:
            self._failed_specs.pop(name, None)
            self._entries[name] = _ModelEntry(spec=spec, served=served, statuses=tuple(statuses))
        if first_error is not None:
            raise first_error
        return tuple(statuses)

    def fingerprint(self, name: str) -> tuple[tuple[str, int, int], ...]:
        """Names, sizes and mtimes of what a load reads, to notice changes without hashing."""
        model_dir = self._repository / name
        paths = [model_dir / "model.toml", *sorted(model_dir.glob("*/model.onnx*"))]
        out = []
        for path in paths:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            out.append((str(path.relative_to(model_dir)), stat.st_size, stat.st_mtime_ns))
        return tuple(out)

    def loaded_names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def unload(self, name: str) -> None:
        """Stop serving ``name``. Requests already holding a version finish on it."""
        with self._lock:
            if self._entries.pop(name, None) is None:
                raise ModelNotFoundError(f"model {name!r} is not loaded")

    def get(self, name: str, version: str | None = None) -> ServedVersion:
        """The version to run: the requested one, else the newest serving one."""
        entry = self._entries.get(name)
        if entry is None:
            if (self._repository / name / "model.toml").is_file():
                raise ModelNotReadyError(f"model {name!r} is not serving", retry_after_s=5)
            raise ModelNotFoundError(f"model {name!r} is not in the repository")
        if version is None:
            if not entry.served:
                raise ModelNotReadyError(f"model {name!r} has no serving version", retry_after_s=5)
            return entry.served[max(entry.served, key=int)]
        served = entry.served.get(version)
        if served is None:
            if version in entry.spec.versions:
                raise ModelNotReadyError(f"model {name!r} version {version} is not serving", retry_after_s=5)
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}")
        return served

    def specs(self) -> list[ModelSpec]:
        return [entry.spec for _, entry in sorted(self._entries.items())]

    def served_versions(self, name: str) -> list[ServedVersion]:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        return [entry.served[v] for v in sorted(entry.served, key=int)]

    def all_served(self) -> list[ServedVersion]:
        with self._lock:
            return [sv for entry in self._entries.values() for sv in entry.served.values()]

    def statuses(self) -> tuple[VersionStatus, ...]:
        with self._lock:
            rows = [s for entry in self._entries.values() for s in entry.statuses]
            rows.extend(self._failed_specs.values())
        return tuple(sorted(rows, key=lambda s: (s.model, s.version)))

    def models_ready(self) -> bool:
        """True once the first load finished and some model serves (or the repository is empty).

        A model refused at start-up does not take the others down: ``/readyz`` reports it in
        its details, and the metrics count it, but the replica keeps serving the rest.
        """
        if not self.initial_load_done:
            return False
        with self._lock:
            any_serving = any(entry.served for entry in self._entries.values())
        return any_serving or not any(True for _ in iter_model_dirs(self._repository))
