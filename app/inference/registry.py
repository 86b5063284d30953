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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from app.domain import VersionState, VersionStatus
from app.errors import (
    MedinferError,
    ModelIntegrityError,
    ModelLoadError,
    ModelNotAcknowledgedError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from app.inference.release import verify_release
from app.inference.session import LoadedSession, open_session
from app.inference.spec import ModelSpec, iter_model_dirs, load_spec
from app.inference.tensors import parse_feature_contract
from app.observability.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClinicalUsePolicy:
    """What a deployment may do with a model whose ``model.toml`` says ``not_for_clinical_use``.

    In production such a version is served only if the operator names it (``name@version``) in
    ``MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS``, and even then its results never reach a PACS
    as a coded finding. Outside production (dev, test) nothing is refused or withheld, so the
    reference models keep serving developers and the test suite.
    """

    production: bool = False
    acknowledged: frozenset[str] = frozenset()

    def refuses(self, spec: ModelSpec, version: str) -> bool:
        """True if this version must not be served here."""
        return self.production and spec.not_for_clinical_use and f"{spec.name}@{version}" not in self.acknowledged

    def withholds_results(self, spec: ModelSpec) -> bool:
        """True if this model's results must not be delivered to a PACS or HIS."""
        return self.production and spec.not_for_clinical_use


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
    """Verify one version's checksum (and release signature, if a key is trusted), then open and warm it.

    The file is read once: the bytes that were checked are the bytes ONNX Runtime gets, so a
    file swapped on disk in between cannot slip through. Raises :class:`ModelIntegrityError`,
    :class:`ModelSignatureError`, :class:`ModelSpecError` if its feature contract cannot apply, or
    :class:`ModelLoadError` if the file is missing or will not run.
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
        verify_release(spec, path.parent, actual, trusted_key, label)
    parse_feature_contract(spec)  # a contract that cannot apply refuses the version, not each request
    loaded = open_session(spec, data)
    return ServedVersion(spec=spec, version=version, sha256=actual, loaded=loaded)


def _failed(spec: ModelSpec, version: str, error: MedinferError) -> VersionStatus:
    """The status of a version that does not serve, and why."""
    return VersionStatus(
        model=spec.name,
        version=version,
        state=VersionState.FAILED,
        sha256=spec.versions[version].sha256,
        error_code=error.code,
        error=error.detail,
    )


class ModelRegistry:
    """All models of one repository and the versions of each that serve now."""

    def __init__(
        self,
        repository: Path,
        trusted_key: Ed25519PublicKey | None = None,
        *,
        policy: ClinicalUsePolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._repository = repository
        self._trusted_key = trusted_key
        self._policy = policy or ClinicalUsePolicy()
        self._metrics = metrics
        self._lock = threading.Lock()
        self._entries: dict[str, _ModelEntry] = {}
        self._failed_specs: dict[str, VersionStatus] = {}
        self._initial_load_done = threading.Event()

    @property
    def repository(self) -> Path:
        return self._repository

    @property
    def policy(self) -> ClinicalUsePolicy:
        return self._policy

    @property
    def initial_load_done(self) -> bool:
        return self._initial_load_done.is_set()

    def load_all(self) -> None:
        """Load every model of the repository (blocking). Failures are recorded, not raised."""
        try:
            for model_dir in iter_model_dirs(self._repository):
                try:
                    self.load(model_dir.name)
                except ModelNotAcknowledgedError:
                    continue  # a deliberate policy refusal, logged as model.refused
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
            if self._policy.refuses(spec, version):
                refusal = self._refuse(spec, version)
                first_error = first_error or refusal
                statuses.append(_failed(spec, version, refusal))
                continue
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
                statuses.append(_failed(spec, version, exc))
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
            # Nothing new loaded: what served before keeps serving, and the statuses say so (but
            # never a version the clinical-use policy now refuses).
            served = {v: sv for v, sv in previous.served.items() if not self._policy.refuses(spec, v)}
            tried = {s.version for s in statuses}
            statuses[:0] = [
                s
                for s in previous.statuses
                if s.state is VersionState.READY and s.version not in tried and s.version in served
            ]
        with self._lock:
            self._failed_specs.pop(name, None)
            self._entries[name] = _ModelEntry(spec=spec, served=served, statuses=tuple(statuses))
        if first_error is not None:
            raise first_error
        return tuple(statuses)

    def _refuse(self, spec: ModelSpec, version: str) -> ModelNotAcknowledgedError:
        """Record a production-gate refusal (log line, metric) and return the error that says why."""
        log.warning(
            "model version not served: not for clinical use and not acknowledged",
            extra={
                "event": "model.refused",
                "model": spec.name,
                "version": version,
                "reason": "not_acknowledged",
                "code": ModelNotAcknowledgedError.code,
            },
        )
        if self._metrics is not None:
            self._metrics.models_refused.labels(model=spec.name, version=version, reason="not_acknowledged").inc()
        return ModelNotAcknowledgedError(
            f"{spec.name} v{version} is marked not_for_clinical_use and production serves it only when "
            f"MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS names {spec.name}@{version}; not loaded"
        )

    def fingerprint(self, name: str) -> tuple[tuple[str, int, int], ...]:
        """Names, sizes and mtimes of what a load reads, to notice changes without hashing."""
        model_dir = self._repository / name
        paths = [
            model_dir / "model.toml",
            *sorted(model_dir.glob("*/model.onnx*")),
            *sorted(model_dir.glob("*/release.sig")),
        ]
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
                if entry.statuses and all(s.error_code == ModelNotAcknowledgedError.code for s in entry.statuses):
                    raise ModelNotAcknowledgedError(f"model {name!r} is not served here: not for clinical use")
                raise ModelNotReadyError(f"model {name!r} has no serving version", retry_after_s=5)
            return entry.served[max(entry.served, key=int)]
        served = entry.served.get(version)
        if served is None:
            if version in entry.spec.versions and self._policy.refuses(entry.spec, version):
                raise ModelNotAcknowledgedError(
                    f"model {name!r} version {version} is not served here: not for clinical use"
                )
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
        """True once the first load finished and some model serves (or the repository is empty,
        or every version was refused by the production gate).

        A model refused at start-up does not take the others down: ``/readyz`` reports it in
        its details, and the metrics count it, but the replica keeps serving the rest. A
        deliberate policy refusal (``model-not-acknowledged``) is the configured outcome, not a
        fault: the replica is ready, serves nothing unacknowledged, and ``/readyz`` says why. A
        version that failed for any other reason keeps readiness red while nothing serves.
        """
        if not self.initial_load_done:
            return False
        with self._lock:
            any_serving = any(entry.served for entry in self._entries.values())
            rows = [s for entry in self._entries.values() for s in entry.statuses]
            rows.extend(self._failed_specs.values())
        if any_serving:
            return True
        if rows and all(s.error_code == ModelNotAcknowledgedError.code for s in rows):
            return True
        return not any(True for _ in iter_model_dirs(self._repository))
