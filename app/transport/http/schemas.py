"""Wire models of the HTTP API. Separate from domain types and tables on purpose: the wire
format is a contract with generated clients and changes only with a version bump."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from joserfc.errors import JoseError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.domain import Scope, VersionStatus
from app.feedback import Reason
from app.security.clients import CLIENT_ID_PATTERN, ClientKeyInfo
from app.security.jwe import import_public_jwk, seal_for
from app.security.oauth import MAX_CLIENT_ID_CHARS

VERSION_STATUS_EXAMPLE: dict[str, Any] = {
    "model": "cxr-pneumonia",
    "version": "1",
    "state": "ready",
    "sha256": "9b1c0e4c5d6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b",
    "providers": ["CPUExecutionProvider"],
    "error_code": None,
    "error": None,
}


MODEL_SUMMARY_EXAMPLE: dict[str, Any] = {
    "name": "cxr-pneumonia",
    "task": "classification",
    "description": "Pneumonia on frontal chest radiographs (demonstration model).",
    "intended_use": "Demonstration of the medinfer service. Not a medical device.",
    "not_for_clinical_use": True,
    "labels": ["normal", "pneumonia"],
    "positive_label": "pneumonia",
    "default_threshold": 0.6,
    "operating_points": {
        "high_sensitivity": {"threshold": 0.6, "sensitivity": 0.9, "specificity": 0.994, "split": "validation"}
    },
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 224, 224]}],
    "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
    ],
    "versions": [
        {
            "version": "2",
            "sha256": "9b1c0e4c5d6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b",
            "providers": ["CPUExecutionProvider"],
            "ood": {
                "method": "mahalanobis-penultimate",
                "output": "ood_score",
                "threshold": 25.0,
                "in_distribution_flagged": 0.01,
                "training_ranges": {},
                "max_imputed": None,
            },
        }
    ],
}


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ValidationIssue(BaseModel):
    loc: list[str]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details. ``code`` is the stable machine-readable error code."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {
                "type": "/problems/model-not-found",
                "title": "Model not found",
                "status": 404,
                "detail": "model 'cxr-pneumonia' is not in the repository",
                "code": "model-not-found",
                "instance": "/v1/models/cxr-pneumonia",
                "request_id": "5f0c6d0e-8a0b-4a52-9a43-2f1d2b7b9c11",
            }
        },
    )

    type: str = Field(description="URI reference naming the problem type: /problems/<code>.")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    code: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[ValidationIssue] | None = Field(default=None, description="Schema violations, for 422 only.")


class ProblemType(_Wire):
    """Documentation of one problem type, served at its ``type`` URI."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "code": "model-integrity",
                "title": "Model integrity check failed",
                "status": 409,
                "description": "A model file's sha256 differs from the one pinned in model.toml.",
            }
        },
    )

    code: str
    title: str
    status: int
    description: str


class Liveness(_Wire):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"status": "ok"}})

    status: Literal["ok"]


class ModelVersionStatus(_Wire):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": VERSION_STATUS_EXAMPLE},
    )

    model: str
    version: str
    state: Literal["loading", "ready", "failed", "unloaded"]
    sha256: str
    providers: list[str]
    error_code: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, status: VersionStatus) -> ModelVersionStatus:
        return cls(
            model=status.model,
            version=status.version,
            state=status.state.value,
            sha256=status.sha256,
            providers=list(status.providers),
            error_code=status.error_code,
            error=status.error,
        )


class ReadinessReport(_Wire):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "ready": True,
                "checks": {"database": True, "models": True},
                "models": [VERSION_STATUS_EXAMPLE],
            }
        },
    )

    ready: bool
    checks: dict[str, bool] = Field(description="Each dependency and whether it is ready.")
    models: list[ModelVersionStatus]


class OperatingPoint(_Wire):
    threshold: float
    sensitivity: float | None = None
    specificity: float | None = None
    split: Literal["validation", "internal_test", "external_test"] | None = Field(
        default=None,
        description="The data the sensitivity and specificity were measured on: `validation` (where the threshold "
        "was chosen; optimistic), `internal_test` (held out, same sites) or `external_test` (a site never seen). "
        "None: the model card does not say.",
    )


class OodDetector(_Wire):
    """How a version recognises input outside what it was validated on; such input is answered
    "indeterminate" instead of a label."""

    method: str
    output: str | None = Field(description="The ONNX output holding one score per image.")
    threshold: float | None = Field(description="A score above it is outside the validated input.")
    in_distribution_flagged: float | None = Field(
        description="Measured share of the in-distribution test set the detector flags (the price of safety)."
    )
    training_ranges: dict[str, list[float]] = Field(description="Record models: each feature's training range.")
    max_imputed: int | None = Field(description="Record models: more imputed features is indeterminate.")


class TensorMetadata(_Wire):
    name: str
    datatype: str
    shape: list[int]


class ModelVersionSummary(_Wire):
    version: str
    sha256: str
    providers: list[str]
    ood: OodDetector | None = Field(default=None, description="None: this version declares no detector.")


class ModelSummary(_Wire):
    """A model as it serves now, with the provenance every result cites."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": MODEL_SUMMARY_EXAMPLE},
    )

    name: str
    task: str
    description: str
    intended_use: str
    not_for_clinical_use: bool
    labels: list[str]
    positive_label: str | None
    default_threshold: float | None
    operating_points: dict[str, OperatingPoint]
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    versions: list[ModelVersionSummary] = Field(description="Serving versions, oldest first.")


class ModelList(_Wire):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"models": [MODEL_SUMMARY_EXAMPLE]}})

    models: list[ModelSummary]


class ModelLoadResult(_Wire):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "model": "cxr-pneumonia",
                "versions": [VERSION_STATUS_EXAMPLE],
            }
        },
    )

    model: str
    versions: list[ModelVersionStatus]


class ClientRegistration(_Wire):
    """Register an API client (an HIS interface, a PACS bridge, an operator tool)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"client_id": "his-epic-prod", "scopes": ["infer", "models:read"]}},
    )

    client_id: str = Field(min_length=1, max_length=MAX_CLIENT_ID_CHARS, pattern=CLIENT_ID_PATTERN)
    # Checked against Scope by the route (a 422 naming the valid scopes); the enum is for the document.
    scopes: list[Annotated[str, Field(json_schema_extra={"enum": [s.value for s in Scope]})]] = Field(
        min_length=1, max_length=16
    )
    encryption_jwk: dict[str, Any] | None = Field(
        default=None,
        description="Public EC or RSA JWK; results are sealed to it when the client sends Accept: application/jose.",
    )
    signing_jwk: dict[str, Any] | None = Field(
        default=None, description="Public JWK; when set, this client's payloads must be signed (JWS) then encrypted."
    )

    @field_validator("encryption_jwk")
    @classmethod
    def _sealable(cls, jwk: dict[str, Any] | None) -> dict[str, Any] | None:
        """A key results cannot be sealed to would turn every later sealed answer into a 500."""
        if jwk is not None:
            _usable(jwk, lambda key: seal_for(b"{}", "application/json", key), "results can be sealed to")
        return jwk

    @field_validator("signing_jwk")
    @classmethod
    def _verifiable(cls, jwk: dict[str, Any] | None) -> dict[str, Any] | None:
        if jwk is not None:
            _usable(jwk, import_public_jwk, "signatures can be verified with")
        return jwk


def _usable(jwk: dict[str, Any], use: Callable[[dict[str, Any]], object], purpose: str) -> None:
    # ValueError is what pydantic turns into a 422; the key itself is never echoed.
    if "d" in jwk:
        raise ValueError("register public keys only (the JWK has a private 'd' member)")
    try:
        use(jwk)
    except (JoseError, ValueError, TypeError, LookupError) as exc:
        raise ValueError(f"not a public key {purpose}") from exc


class ClientCredentials(_Wire):
    """The new client's API key. It is shown once and stored only as a hash."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "client_id": "his-epic-prod",
                "scopes": ["models:read", "infer"],
                "api_key": "mi_Jk3v0QvA1n9m5lX2cR8tY6uE4wZ7bP0sD1fG3hJ5kL8",
            }
        },
    )

    client_id: str
    scopes: list[str]
    api_key: str


_CLIENT_KEY_EXAMPLE: dict[str, Any] = {
    "client_id": "his-epic-prod",
    "key_id": "3f9a1c07d2b84e65",
    "scopes": ["infer", "models:read"],
    "created_at": "2026-11-02T09:14:03Z",
    "revoked_at": None,
    "seals_results": True,
    "signs_payloads": False,
}


class RegisteredClient(_Wire):
    """One API key of a client. Neither the key nor its hash or salt is ever shown again."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": _CLIENT_KEY_EXAMPLE})

    client_id: str
    key_id: str = Field(description="The part of the API key before the dot (`mi_<key_id>.<secret>`); not secret.")
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    seals_results: bool = Field(description="An encryption JWK is registered (results may be sealed to it).")
    signs_payloads: bool = Field(description="A signing JWK is registered (payloads must be signed, then encrypted).")

    @classmethod
    def of(cls, info: ClientKeyInfo) -> RegisteredClient:
        return cls(
            client_id=info.client_id,
            key_id=info.key_id,
            scopes=list(info.scopes),
            created_at=info.created_at,
            revoked_at=info.revoked_at,
            seals_results=info.seals_results,
            signs_payloads=info.signs_payloads,
        )


class ClientList(_Wire):
    """Registered keys by client id, revoked ones included (``revoked_at`` set)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "clients": [
                    _CLIENT_KEY_EXAMPLE,
                    _CLIENT_KEY_EXAMPLE
                    | {
                        "client_id": "pacs-bridge",
                        "key_id": "a07be2d95c3f1846",
                        "scopes": ["infer"],
                        "revoked_at": "2026-12-01T16:40:00Z",
                        "seals_results": False,
                    },
                ]
            }
        },
    )

    clients: list[RegisteredClient]


_HASH_EXAMPLE = "4c1f0f2b8f0e4a6b9d3e2c1a0b9f8e7d6c5b4a3928171605f4e3d2c1b0a99887"


class AuditVerification(_Wire):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "valid": False,
                "events": 41,
                "head_seq": 57,
                "head_hash": _HASH_EXAMPLE,
                "first_broken_seq": 42,
                "reason": "content does not match its hash (altered)",
                "checkpoint_seq": 57,
            }
        },
    )

    valid: bool
    events: int = Field(description="Events verified before the first break (all of them when valid).")
    head_seq: int
    head_hash: str
    first_broken_seq: int | None
    reason: str | None
    checkpoint_seq: int | None = Field(
        default=None,
        description="The signed checkpoint (kept outside the database) that decided the result: the one the "
        "chain broke (a rollback), or the latest one when the chain is valid. Every signed checkpoint is "
        "checked: the events up to it must be there with the hash it names. None: no checkpoint yet.",
    )


class AuditEventOut(_Wire):
    seq: int
    occurred_at: datetime
    request_id: str | None
    action: str
    outcome: str
    actor: str | None
    source_ip: str | None
    model: str | None
    model_version: str | None
    model_sha256: str | None
    input_sha256: str | None
    output_sha256: str | None
    patient_pseudonym: str | None
    study_pseudonym: str | None
    detail: dict[str, Any]
    hash: str


class AuditEventPage(_Wire):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "events": [
                    {
                        "seq": 42,
                        "occurred_at": "2026-11-28T13:05:12.123456Z",
                        "request_id": "5f0c6d0e-8a0b-4a52-9a43-2f1d2b7b9c11",
                        "action": "inference",
                        "outcome": "success",
                        "actor": "his-epic-prod",
                        "source_ip": "10.1.2.3",
                        "model": "ehr-heart-disease",
                        "model_version": "1",
                        "model_sha256": _HASH_EXAMPLE,
                        "input_sha256": _HASH_EXAMPLE,
                        "output_sha256": _HASH_EXAMPLE,
                        "patient_pseudonym": _HASH_EXAMPLE,
                        "study_pseudonym": None,
                        "detail": {"outputs": {"probabilities": [[0.31, 0.69]]}},
                        "hash": _HASH_EXAMPLE,
                    }
                ],
                "next_cursor": "42",
            }
        },
    )

    events: list[AuditEventOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


PREDICTION_EXAMPLE: dict[str, Any] = {
    "request_id": "5f0c6d0e-8a0b-4a52-9a43-2f1d2b7b9c11",
    "model": {
        "name": "ehr-heart-disease",
        "version": "1",
        "sha256": _HASH_EXAMPLE,
        "intended_use": "Demonstration and integration testing of medinfer's FHIR path. Not a medical device.",
        "not_for_clinical_use": True,
    },
    "probabilities": {"no_cad": 0.31, "cad": 0.69},
    "decision": {
        "label": "cad",
        "indeterminate": False,
        "positive": True,
        "positive_label": "cad",
        "threshold": 0.4541,
        "operating_point": "default",
    },
    "validated_input": {
        "inside": True,
        "verdict": "inside the model's validated input",
        "method": "training-range",
        "score": 0.0,
        "threshold": 0.0,
        "reasons": [],
    },
    "input": {
        "kind": "fhir",
        "patient": "Patient/p1",
        "observations": ["bp1"],
        "imputed": ["chol"],
        "features": [
            {"name": "age", "value": 61.0, "unit": "a", "source": "Patient/p1", "imputed": False},
            {"name": "trestbps", "value": 148.0, "unit": "mm[Hg]", "source": "Observation/bp1", "imputed": False},
            {"name": "chol", "value": 240.0, "unit": "mg/dL", "source": None, "imputed": True},
        ],
    },
    "warnings": ["not for clinical use"],
}

#: A real chest radiograph sent to the phantom-trained demonstration model.
INDETERMINATE_EXAMPLE: dict[str, Any] = {
    **PREDICTION_EXAMPLE,
    "model": {**PREDICTION_EXAMPLE["model"], "name": "cxr-pneumonia", "version": "2"},
    "probabilities": None,
    "decision": {
        "label": "indeterminate",
        "indeterminate": True,
        "positive": None,
        "positive_label": "pneumonia",
        "threshold": 0.6049,
        "operating_point": "default",
    },
    "validated_input": {
        "inside": False,
        "verdict": "indeterminate: outside the model's validated input",
        "method": "mahalanobis-penultimate",
        "score": 4210.5,
        "threshold": 25.0,
        "reasons": [{"code": "ood_score", "text": "mahalanobis-penultimate score above the validated threshold"}],
    },
    "input": {"kind": "dicom", "study_instance_uid": "1.2.3", "series_instance_uids": ["1.2.3.4"]},
    "warnings": [
        "not for clinical use",
        "indeterminate: outside the model's validated input (score 4210, threshold 25): "
        "mahalanobis-penultimate score above the validated threshold",
    ],
}

RISK_ASSESSMENT_EXAMPLE: dict[str, Any] = {
    "resourceType": "RiskAssessment",
    "status": "preliminary",
    "subject": {"reference": "Patient/p1"},
    "performer": {"reference": "#model", "display": "ehr-heart-disease v1"},
    "basis": [{"reference": "Observation/bp1"}],
    "prediction": [
        {"outcome": {"text": "no_cad"}, "probabilityDecimal": 31.0},
        {"outcome": {"text": "cad"}, "probabilityDecimal": 69.0},
    ],
    "extension": [
        {
            "url": "urn:medinfer:fhir:StructureDefinition:feature-used",
            "extension": [
                {"url": "name", "valueString": "trestbps"},
                {
                    "url": "value",
                    "valueQuantity": {
                        "value": 148.0,
                        "unit": "mm[Hg]",
                        "system": "http://unitsofmeasure.org",
                        "code": "mm[Hg]",
                    },
                },
                {"url": "source", "valueReference": {"reference": "Observation/bp1"}},
                {"url": "imputed", "valueBoolean": False},
            ],
        }
    ],
    "note": [
        {"text": "Not for clinical use."},
        {"text": "Inputs used by the model: age = 61 a (Patient/p1); trestbps = 148 mm[Hg] (Observation/bp1)"},
    ],
}

#: A result sealed to the client's registered key (``Accept: application/jose``), shortened.
SEALED_EXAMPLE = "eyJhbGciOiJFQ0RILUVTK0EyNTZLVyIsImVuYyI6IkEyNTZHQ00iLCJjdHkiOiJhcHBsaWNhdGlvbi9qc29uIn0.Qx0.bW.Zg.dA"

_JWE_STRING: dict[str, Any] = {"type": "string", "pattern": r"^[A-Za-z0-9_-]*$"}

#: Request bodies sealed to the service's JWKS (``deps.read_payload`` opens them), as documented on
#: every operation that takes one: the compact serialization, or the JSON one for one recipient.
SEALED_REQUEST_CONTENT: dict[str, Any] = {
    "application/jose": {
        "schema": {
            "type": "string",
            "title": "JWE (compact serialization)",
            "pattern": r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]*){4}$",
        },
        "example": SEALED_EXAMPLE,
    },
    "application/jose+json": {
        "schema": {
            "type": "object",
            "title": "JWE (JSON serialization, one recipient, no aad)",
            "required": ["protected", "ciphertext"],
            "properties": {
                **dict.fromkeys(("protected", "encrypted_key", "iv", "ciphertext", "tag"), _JWE_STRING),
                "unprotected": {"type": "object"},
                "header": {"type": "object"},
                "recipients": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {"header": {"type": "object"}, "encrypted_key": _JWE_STRING},
                    },
                },
            },
            "not": {"required": ["aad"]},
        },
        "example": {
            "protected": SEALED_EXAMPLE.partition(".")[0],
            "encrypted_key": "Qx0",
            "iv": "bW",
            "ciphertext": "Zg",
            "tag": "dA",
        },
    },
}


#: The request id of the example: ``tests/api/test_feedback.py`` predicts under it and then sends
#: this example as it stands, so the documented body is one that works.
EXAMPLE_REQUEST_ID: Final = "5f0c1e2a-7b3d-4c8e-9a61-0d2f4b6e8a10"
_SHA256_EXAMPLE: Final = "cc1d5a7f5975e1ae696837d4c3f65d676982cb637375a4061af6259f2e5f12f7"


class FeedbackRequest(BaseModel):
    """A confirmed outcome for one result. No free text: it could hold PHI."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "request_id": EXAMPLE_REQUEST_ID,
                "verdict": "disagree",
                "confirmed_label": "no_cad",
                "reason": "angiography",
                "model": "ehr-heart-disease",
            }
        },
    )

    request_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="The `request_id` of the prediction answer (its `X-Request-ID`).",
    )
    verdict: Literal["agree", "disagree", "label"] = Field(
        description="`agree`: the decided label was right. `disagree`: it was wrong (a two-label model's other "
        "label is implied). `label`: the confirmed label, whatever was decided."
    )
    confirmed_label: str | None = Field(
        default=None, max_length=64, description="One of the model's labels; required with `label`."
    )
    reason: Reason | None = Field(default=None, description="How the outcome was confirmed.")
    model: str | None = Field(
        default=None, max_length=64, description="If given, the result must be of this model (else 404)."
    )


class ProportionOut(BaseModel):
    """A proportion with its Wilson score 95 % confidence interval."""

    value: float
    ci95_low: float
    ci95_high: float
    successes: int
    total: int


class ConfusionOut(BaseModel):
    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int
    sensitivity: ProportionOut | None
    specificity: ProportionOut | None


class OperatingPointCheckOut(BaseModel):
    name: str
    threshold: float
    claimed_sensitivity: float | None
    claimed_specificity: float | None
    split: str | None = Field(description="The data the claim was measured on (model.toml).")
    sensitivity_floor: float | None = Field(description="Claimed sensitivity minus the model's margin.")
    confirmed: ConfusionOut = Field(description="Confirmed cases with their probability thresholded here.")


class VersionPerformanceOut(BaseModel):
    version: str
    confirmed_cases: int
    confirmed_by_label: dict[str, int]
    as_decided: ConfusionOut = Field(description="Each result counted at the operating point it was decided at.")
    calibration_error: float | None = Field(description="Expected calibration error, 10 equal-width bins.")
    monitored_operating_point: str | None = Field(
        description="The declared operating point at the default threshold: the alert compares against its floor."
    )
    below_floor: bool | None
    operating_points: list[OperatingPointCheckOut]


_COUNTS: Final[dict[str, Any]] = {"true_positive": 4, "false_negative": 1, "true_negative": 3, "false_positive": 2}
_CONFUSION_EXAMPLE: Final[dict[str, Any]] = {
    **_COUNTS,
    "sensitivity": {"value": 0.8, "ci95_low": 0.3755, "ci95_high": 0.9638, "successes": 4, "total": 5},
    "specificity": {"value": 0.6, "ci95_low": 0.2307, "ci95_high": 0.8824, "successes": 3, "total": 5},
}


class ModelPerformanceOut(BaseModel):
    """Running performance of each version over outcomes confirmed so far."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "model": "ehr-heart-disease",
                "positive_label": "cad",
                "sensitivity_margin": 0.1,
                "versions": [
                    {
                        "version": "1",
                        "confirmed_cases": 10,
                        "confirmed_by_label": {"no_cad": 5, "cad": 5},
                        "as_decided": _CONFUSION_EXAMPLE,
                        "calibration_error": 0.2415,
                        "monitored_operating_point": "high_sensitivity",
                        "below_floor": False,
                        "operating_points": [
                            {
                                "name": "high_sensitivity",
                                "threshold": 0.4541,
                                "claimed_sensitivity": 0.8611,
                                "claimed_specificity": 0.7083,
                                "split": "validation",
                                "sensitivity_floor": 0.7611,
                                "confirmed": _CONFUSION_EXAMPLE,
                            }
                        ],
                    }
                ],
            }
        }
    )

    model: str
    positive_label: str | None
    sensitivity_margin: float
    versions: list[VersionPerformanceOut]


class FeedbackOut(BaseModel):
    """The stored outcome: label names, numbers from the result's audit event, the client id."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "request_id": EXAMPLE_REQUEST_ID,
                "model": "ehr-heart-disease",
                "version": "1",
                "model_sha256": _SHA256_EXAMPLE,
                "probability": 0.87,
                "decided_label": "cad",
                "threshold": 0.4541,
                "operating_point": "default",
                "confirmed_label": "no_cad",
                "verdict": "disagree",
                "reason": "angiography",
                "recorded_by": "his-epic-prod",
                "recorded_at": "2026-12-04T16:20:00Z",
            }
        }
    )

    request_id: str
    model: str
    version: str
    model_sha256: str
    probability: float | None = Field(description="The positive label's probability in the result.")
    decided_label: str
    threshold: float | None
    operating_point: str | None
    confirmed_label: str
    verdict: Literal["agree", "disagree", "label"]
    reason: Reason | None
    recorded_by: str
    recorded_at: datetime
