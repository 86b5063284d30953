"""Frozen value types shared by the stages of the pipeline. No I/O, no framework imports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Scope(StrEnum):
    """Permissions a client may hold. Routes declare the one they need."""

    INFER = "infer"
    MODELS_READ = "models:read"
    MODELS_ADMIN = "models:admin"
    AUDIT_READ = "audit:read"
    METRICS_READ = "metrics:read"
    CLIENTS_ADMIN = "clients:admin"
    FEEDBACK_WRITE = "feedback:write"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a registered client, authenticated by the security layer."""

    client_id: str
    scopes: frozenset[Scope]
    encryption_jwk: Mapping[str, Any] | None = None
    signing_jwk: Mapping[str, Any] | None = None

    def has(self, scope: Scope) -> bool:
        return scope in self.scopes


class VersionState(StrEnum):
    """Lifecycle of one model version inside the registry."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """What the registry knows about one version: served or not, and why."""

    model: str
    version: str
    state: VersionState
    sha256: str
    providers: tuple[str, ...] = ()
    error_code: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Readiness:
    """The answer behind ``/readyz``: ready only when every dependency is."""

    database: bool
    models_loaded: bool
    models: tuple[VersionStatus, ...] = field(default_factory=tuple)

    @property
    def ready(self) -> bool:
        return self.database and self.models_loaded


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """An event to append to the audit trail.

    Identifiers arrive in clear and live only in memory: the recorder replaces them with keyed
    pseudonyms before anything is serialised or stored.
    """

    action: str
    outcome: str
    request_id: str | None = None
    actor: str | None = None
    source_ip: str | None = None
    model: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uids: tuple[str, ...] = ()
    detail: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who asked, from where, under which request id, and the hash of what they sent."""

    actor: str | None
    request_id: str | None
    source_ip: str | None
    input_sha256: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FeatureUse:
    """What one feature gave the model, and where it came from: shown to the clinician.

    ``value`` is what the model received in the declared ``unit`` (after unit conversion and
    code mapping); for an imputed feature it is the imputation value the graph substitutes.
    ``source`` is a FHIR reference (``Observation/id``, ``Patient/id``), ``"request"`` for plain
    features, or None when imputed.
    """

    name: str
    value: float
    unit: str | None
    source: str | None
    imputed: bool
