"""Predictions as FHIR R4 RiskAssessment resources that reference the model as a Device."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from fhir.resources.R4B.riskassessment import RiskAssessment

from app.domain import FeatureUse
from app.inference.registry import ServedVersion
from app.postprocess.classification import Classification

NOT_FOR_CLINICAL_USE: Final = "Not for clinical use."
MODEL_SHA256_SYSTEM: Final = "urn:medinfer:model-sha256"
#: One extension per model input: which value the model received and where it came from.
FEATURE_USED_EXTENSION: Final = "urn:medinfer:fhir:StructureDefinition:feature-used"
UCUM: Final = "http://unitsofmeasure.org"


def risk_assessment(
    served: ServedVersion,
    classification: Classification,
    *,
    patient_reference: str | None,
    observation_ids: list[str],
    request_id: str | None,
    used: Sequence[FeatureUse] = (),
    imaging_study_uid: str | None = None,
) -> dict[str, Any]:
    """A validated R4 RiskAssessment.

    ``prediction.probabilityDecimal`` is a percentage: R4 constrains it to at most 100
    (invariant ras-2; "decimal values are expressed as percentages as well").

    An EHR reads ``prediction.outcome`` as the finding. So an input outside the model's validated
    input gets one prediction whose outcome is the text "indeterminate: ..." with the detector's
    score, and no probability; and a model that is not for clinical use never codes its outcome
    (text only), so no system files it as a coded finding. What the model used is in ``basis``,
    in one ``feature-used`` extension per input, and in a note a person can read. A study's
    assessment has the ImagingStudy, by its Study Instance UID, as its basis.
    """
    spec = served.spec
    notes = [{"text": f"Intended use: {spec.intended_use}"}]
    if spec.not_for_clinical_use:
        notes.insert(0, {"text": NOT_FOR_CLINICAL_USE})
    if used:
        notes.append({"text": "Inputs used by the model: " + "; ".join(_used_text(u) for u in used)})
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
        "prediction": _predictions(served, classification),
        "note": notes,
    }
    if used:
        resource["extension"] = [_used_extension(u) for u in used]
    if imaging_study_uid:
        resource["basis"].append(
            {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{imaging_study_uid}"}}
        )
    if patient_reference:
        resource["subject"] = {"reference": patient_reference}
    else:
        resource["subject"] = {"display": "patient not identified in the request"}
    if request_id:
        resource["identifier"] = [{"system": "urn:medinfer:request-id", "value": request_id}]
    RiskAssessment.model_validate(resource)
    return resource


def _predictions(served: ServedVersion, classification: Classification) -> list[dict[str, Any]]:
    ood = classification.ood
    if classification.indeterminate and ood is not None:
        return [{"outcome": {"text": classification.label}, "rationale": ood.summary()}]
    spec = served.spec
    predictions = []
    for label, probability in classification.probabilities.items():
        outcome: dict[str, Any] = {"text": label}
        if not spec.not_for_clinical_use:
            outcome["coding"] = [{"system": f"urn:medinfer:model:{spec.name}:label", "code": label}]
        predictions.append({"outcome": outcome, "probabilityDecimal": round(probability * 100.0, 4)})
    return predictions


def _used_text(used: FeatureUse) -> str:
    unit = f" {used.unit}" if used.unit and used.unit != "1" else ""
    where = "imputed" if used.imputed else (used.source or "source not identified")
    return f"{used.name} = {used.value:g}{unit} ({where})"


def _used_extension(used: FeatureUse) -> dict[str, Any]:
    value: dict[str, Any] = {"url": "value"}
    if used.unit:
        value["valueQuantity"] = {"value": used.value, "unit": used.unit, "system": UCUM, "code": used.unit}
    else:
        value["valueDecimal"] = used.value
    parts: list[dict[str, Any]] = [{"url": "name", "valueString": used.name}, value]
    if used.source and "/" in used.source:  # a FHIR reference; "request" is plain features
        parts.append({"url": "source", "valueReference": {"reference": used.source}})
    parts.append({"url": "imputed", "valueBoolean": used.imputed})
    return {"url": FEATURE_USED_EXTENSION, "extension": parts}
