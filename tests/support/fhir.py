"""FHIR R4 Bundles for the EHR path's tests, built the way an HIS would send them.

The shapes follow what EHRs export: US Core vital signs (category ``vital-signs``, the blood
pressure panel 85354-9 with systolic/diastolic ``component``s, heart rate 8867-4), laboratory
results (category ``laboratory``, often the SI-unit LOINC code, UCUM ``code`` with free-text
``unit``), ``dataAbsentReason`` for a value that was not obtained, and the ``searchset`` that
``Patient/$everything`` returns (``search.mode`` on each entry, an OperationOutcome as
``outcome``).
"""

from __future__ import annotations

import copy
from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
SITE = "urn:medinfer:codesystem:uci-heart-disease"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
SERVER = "https://ehr.example.org/fhir"


def _category(code: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": CATEGORY, "code": code}]}]


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


def lab_obs(oid: str, loinc: str, display: str, value: float, ucum: str, when: str) -> dict[str, Any]:
    """A laboratory result as Epic and Cerner export it: category, display text, issued time."""
    obs = quantity_obs(oid, loinc, value, ucum, when)
    obs["category"] = _category("laboratory")
    obs["code"] = {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": display}
    obs["issued"] = when
    return obs


def vital_heart_rate(oid: str, value: float, when: str) -> dict[str, Any]:
    """US Core heart rate: 8867-4, category vital-signs, no method: a ward or resting rate."""
    obs = quantity_obs(oid, "8867-4", value, "/min", when)
    obs["category"] = _category("vital-signs")
    obs["code"]["coding"][0]["display"] = "Heart rate"
    obs["valueQuantity"]["unit"] = "beats/minute"
    return obs


def exercise_max_heart_rate(oid: str, value: float, when: str) -> dict[str, Any]:
    """The peak heart rate of an exercise test: 8867-4 with the method 'cardiovascular stress testing'."""
    obs = quantity_obs(oid, "8867-4", value, "/min", when)
    obs["category"] = _category("procedure")
    obs["method"] = {"coding": [{"system": SNOMED, "code": "76746007", "display": "Cardiovascular stress testing"}]}
    return obs


def blood_pressure_panel(
    oid: str, systolic: float | None, diastolic: float | None, when: str, absent: str | None = None
) -> dict[str, Any]:
    """US Core blood pressure: panel 85354-9, systolic 8480-6 and diastolic 8462-4 as components.

    A component whose value is None carries ``dataAbsentReason`` ``absent`` instead."""

    def component(code: str, display: str, value: float | None) -> dict[str, Any]:
        part: dict[str, Any] = {"code": {"coding": [{"system": LOINC, "code": code, "display": display}]}}
        if value is None:
            part["dataAbsentReason"] = {"coding": [{"system": ABSENT, "code": absent or "unknown"}]}
        else:
            part["valueQuantity"] = {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}
        return part

    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-blood-pressure"]},
        "status": "final",
        "category": _category("vital-signs"),
        "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure panel"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
        "component": [
            component("8480-6", "Systolic blood pressure", systolic),
            component("8462-4", "Diastolic blood pressure", diastolic),
        ],
    }


def absent_obs(oid: str, loinc: str, reason: str, when: str) -> dict[str, Any]:
    """An Observation that says why it has no value (``dataAbsentReason``), as EHRs send 'not done'."""
    obs = quantity_obs(oid, loinc, 0, "1", when)
    del obs["valueQuantity"]
    obs["dataAbsentReason"] = {"coding": [{"system": ABSENT, "code": reason}]}
    return obs


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
    """The 11 Observation-borne features of the Cleveland patient #1 profile (age 63 on `when`).

    ``thalach`` is the exercise test's peak heart rate, so it carries the stress-test method."""
    return [
        coded_obs("cp", "chest-pain-type", "typical-angina", when),
        quantity_obs("bp", "8480-6", 145, "mm[Hg]", when),
        quantity_obs("chol", "2093-3", 233, "mg/dL", when),
        quantity_obs("glu", "1558-6", 150, "mg/dL", when),
        coded_obs("ecg", "resting-ecg", "lv-hypertrophy", when),
        exercise_max_heart_rate("hr", 150, when),
        coded_obs("exang", "exercise-induced-angina", "false", when),
        site_quantity_obs("st", "st-depression", 2.3, "mm", when),
        coded_obs("slope", "st-slope", "downsloping", when),
        site_quantity_obs("ca", "vessels-fluoroscopy", 0, "1", when),
        coded_obs("thal", "thallium-scan", "fixed-defect", when),
    ]


#: The same patient as the vector the model takes (feature_order of model.toml).
FULL_VECTOR = [63, 1, 1, 145, 233, 1, 2, 150, 0, 2.3, 3, 0, 6]


def without(observations: list[dict[str, Any]], *ids: str) -> list[dict[str, Any]]:
    return [o for o in observations if o["id"] not in ids]


def bundle(
    *observations: dict[str, Any], pat: dict[str, Any] | None = None, kind: str = "collection"
) -> dict[str, Any]:
    entries = [{"fullUrl": "urn:uuid:5b7c2a3e-0f3d-4c55-9b8e-0b1b5e9f0a01", "resource": pat or patient()}]
    entries += [{"resource": o} for o in observations]
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def everything(*observations: dict[str, Any], pat: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``GET [base]/Patient/p1/$everything`` returns: a searchset with absolute fullUrls,
    ``search.mode`` on every entry, an Encounter the model does not use, and the server's
    OperationOutcome as an ``outcome`` entry."""
    resource = copy.deepcopy(pat or patient())
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{SERVER}/Patient/{resource['id']}", "resource": resource, "search": {"mode": "match"}}
    ]
    entries.append(
        {
            "fullUrl": f"{SERVER}/Encounter/e1",
            "resource": {
                "resourceType": "Encounter",
                "id": "e1",
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": "Patient/p1"},
            },
            "search": {"mode": "include"},
        }
    )
    entries += [
        {"fullUrl": f"{SERVER}/Observation/{o['id']}", "resource": o, "search": {"mode": "include"}}
        for o in observations
    ]
    entries.append(
        {
            "fullUrl": "urn:uuid:0c6b2f7e-3f1d-4a86-9a55-6f4b1b0d2e11",
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "information", "code": "informational", "diagnostics": "partial results"}],
            },
            "search": {"mode": "outcome"},
        }
    )
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries) - 1,
        "link": [{"relation": "self", "url": f"{SERVER}/Patient/{resource['id']}/$everything"}],
        "entry": entries,
    }


def no_cad_observations(when: str = WHEN) -> list[dict[str, Any]]:
    """A lower-risk profile with no exercise test maximum (born 1969-01-15: 55 on `when`).

    With thalach imputed the model answers no_cad; were a ward heart rate of 72/min read as the
    exercise maximum, it would answer cad: the case a context-bound feature exists for."""
    return [
        coded_obs("cp", "chest-pain-type", "non-anginal-pain", when),
        quantity_obs("bp", "8480-6", 130, "mm[Hg]", when),
        quantity_obs("chol", "2093-3", 240, "mg/dL", when),
        quantity_obs("glu", "1558-6", 90, "mg/dL", when),
        coded_obs("ecg", "resting-ecg", "normal", when),
        coded_obs("exang", "exercise-induced-angina", "false", when),
        site_quantity_obs("st", "st-depression", 1.0, "mm", when),
        coded_obs("slope", "st-slope", "flat", when),
        site_quantity_obs("ca", "vessels-fluoroscopy", 0, "1", when),
        coded_obs("thal", "thallium-scan", "normal", when),
    ]


NO_CAD_BIRTH = "1969-01-15"
#: That profile as the model's vector, thalach (index 7) missing.
NO_CAD_VECTOR = [55, 1, 3, 130, 240, 0, 0, float("nan"), 0, 1.0, 2, 0, 3]
