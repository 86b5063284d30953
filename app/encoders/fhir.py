"""Predictions as FHIR R4 RiskAssessment resources that reference the model as a Device."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from fhir.resources.R4B.riskassessment import RiskAssessment

from app.inference.registry import ServedVersion
from app.postprocess.classification import Classification

NOT_FOR_CLINICAL_USE: Final = "Not for clinical use."
MODEL_SHA256_SYSTEM: Final = "urn:medinfer:model-sha256"


def risk_assessment(
    served: ServedVersion,
    classification: Classification,
    *,
    patient_reference: str | None,
    observation_ids: list[str],
    request_id: str | None,
) -> dict[str, Any]:
    """A validated R4 RiskAssessment.

    ``prediction.probabilityDecimal`` is a percentage: R4 constrains it to at most 100
    (invariant ras-2; "decimal values are expressed as percentages as well").
    """
    spec = served.spec
    notes = [{"text": f"Intended use: {spec.intended_use}"}]
    if spec.not_for_clinical_use:
        notes.insert(0, {"text": NOT_FOR_CLINICAL_USE})
    device = {
        "resourceType": "Device",
        "id": "model",
        "identifier": [{"system": MODEL_SHA256_SYSTEM, "value": served.sha256}],
        "deviceName": [{"name": spec.name, "type": "model-name"}],
        "version": [{"value": served.version}],
        "note": notes,
    }
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "contained": [device],
        # AI output nobody has reviewed yet.
        "status": "preliminary",
        "method": {"text": f"{spec.name} v{served.version}"},
        "occurrenceDateTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "performer": {"reference": "#model", "display": f"{spec.name} v{served.version}"},
        "basis": [{"reference": f"Observation/{oid}"} for oid in observation_ids],
        "prediction": [
            {
                "outcome": {
                    "coding": [{"system": f"urn:medinfer:model:{spec.name}:label", "code": label}],
                    "text": label,
                },
                "probabilityDecimal": round(probability * 100.0, 4),
            }
            for label, probability in classification.probabilities.items()
        ],
        "note": notes,
    }
    if patient_reference:
        resource["subject"] = {"reference": patient_reference}
    else:
        resource["subject"] = {"display": "patient not identified in the request"}
    if request_id:
        resource["identifier"] = [{"system": "urn:medinfer:request-id", "value": request_id}]
    RiskAssessment.model_validate(resource)
    return resource
