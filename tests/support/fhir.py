"""FHIR R4 Bundles for the EHR path's tests, built the way an HIS would send them."""

from __future__ import annotations

from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SITE = "urn:medinfer:codesystem:uci-heart-disease"


def quantity_obs(
    oid: str, loinc: str, value: float, unit: str, when: str, patient: str = "Patient/p1"
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": patient},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def coded_obs(oid: str, code: str, value: str, when: str, patient: str = "Patient/p1") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": SITE, "code": code}]},
        "subject": {"reference": patient},
        "effectiveDateTime": when,
        "valueCodeableConcept": {"coding": [{"system": SITE, "code": value}]},
    }


def site_quantity_obs(oid: str, code: str, value: float, unit: str, when: str) -> dict[str, Any]:
    obs = coded_obs(oid, code, "x", when)
    del obs["valueCodeableConcept"]
    obs["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    return obs


def patient(birth: str = "1961-04-02", gender: str = "male", mrn: str = "MRN-0042") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": mrn}],
        "name": [{"family": "Doe", "given": ["Jane"]}],
        "gender": gender,
        "birthDate": birth,
    }


WHEN = "2024-05-01T09:30:00Z"


def full_observations(when: str = WHEN) -> list[dict[str, Any]]:
    """The 11 Observation-borne features of the Cleveland patient #1 profile (age 63 on `when`)."""
    return [
        coded_obs("cp", "chest-pain-type", "typical-angina", when),
        quantity_obs("bp", "8480-6", 145, "mm[Hg]", when),
        quantity_obs("chol", "2093-3", 233, "mg/dL", when),
        quantity_obs("glu", "1558-6", 150, "mg/dL", when),
        coded_obs("ecg", "resting-ecg", "lv-hypertrophy", when),
        quantity_obs("hr", "8867-4", 150, "/min", when),
        coded_obs("exang", "exercise-induced-angina", "false", when),
        site_quantity_obs("st", "st-depression", 2.3, "mm", when),
        coded_obs("slope", "st-slope", "downsloping", when),
        site_quantity_obs("ca", "vessels-fluoroscopy", 0, "1", when),
        coded_obs("thal", "thallium-scan", "fixed-defect", when),
    ]


#: The same patient as the vector the model takes (feature_order of model.toml).
FULL_VECTOR = [63, 1, 1, 145, 233, 1, 2, 150, 0, 2.3, 3, 0, 6]


def bundle(
    *observations: dict[str, Any], pat: dict[str, Any] | None = None, kind: str = "collection"
) -> dict[str, Any]:
    entries = [{"fullUrl": "urn:uuid:5b7c2a3e-0f3d-4c55-9b8e-0b1b5e9f0a01", "resource": pat or patient()}]
    entries += [{"resource": o} for o in observations]
    return {"resourceType": "Bundle", "type": kind, "entry": entries}
