"""Issue 15's safety cases, answered by one checkout of medinfer: a Markdown table row per case.

Run it once against the code before the clinical-safety work and once after, and put the two
columns side by side::

    cd DIR && PYTHONPATH=DIR python scripts/safety_cases.py --repo DIR > answers.md

It builds that checkout's app in process (``create_app`` behind a ``TestClient``), serves a copy
of the checkout's own ``models/``, and talks to it only over HTTP, as a hospital's systems would.
Answers are summarised without assuming either shape: a key one version lacks prints as "-".
The inputs are real files (pydicom-data's RG1 and RG3), phantoms from ``training.dicom_studies``
and FHIR Bundles in the shapes Epic and Cerner export (US Core vital signs, SI-unit LOINC codes,
``dataAbsentReason``, ``searchset``). Nothing here is patient data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fastapi.testclient import TestClient
from httpx2 import Response  # what starlette's TestClient answers with
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

CXR = "cxr-pneumonia"
EHR = "ehr-heart-disease"
DICOM = "application/dicom"
FHIR_JSON = "application/fhir+json"
CR_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1")
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
SITE = "urn:medinfer:codesystem:uci-heart-disease"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
BASE = "https://fhir.hospital.example/api/FHIR/R4"
#: Real secrets (32+ characters), as an operator would set them in production.
SECRETS = {
    "audit_hmac_key": "case-table-audit-hmac-key-of-forty-chars",
    "pseudonym_key": "case-table-pseudonym-key-of-forty-chars!",
    "key_encryption_key": "case-table-key-encryption-key-forty-char",
}
DETAIL_CHARS = 110


# ----------------------------------------------------------------------------- the service


@dataclass
class Service:
    client: TestClient
    key: str

    def auth(self, **headers: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **headers}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def service(repo: Path, models: tuple[str, ...], **overrides: Any) -> Iterator[Service]:
    """The checkout's app on a copy of its models, migrated, with a key holding every scope."""
    from app.__main__ import main as cli  # noqa: PLC0415 - the checkout's, once --repo is on the path
    from app.__main__ import register_api_client  # noqa: PLC0415 - the checkout's, once --repo is on the path
    from app.config import Settings  # noqa: PLC0415 - the checkout's, once --repo is on the path
    from app.domain import Scope  # noqa: PLC0415 - the checkout's, once --repo is on the path
    from app.main import create_app  # noqa: PLC0415 - the checkout's, once --repo is on the path

    with tempfile.TemporaryDirectory(prefix="safety-cases-") as tmp:
        root = Path(tmp)
        for name in models:
            shutil.copytree(repo / "models" / name, root / "models" / name)
        overrides.setdefault("env", "test")
        settings = Settings(data_dir=root / "var", model_repository=root / "models", **overrides)
        env = {"MEDINFER_ENV": settings.env, "MEDINFER_DATA_DIR": str(settings.data_dir)}
        env |= {f"MEDINFER_{name.upper()}": value for name, value in SECRETS.items()}
        with _environment(env):
            if cli(["migrate"]) != 0:
                msg = "migrate failed"
                raise RuntimeError(msg)
            key = register_api_client(settings, "safety-cases", list(Scope))
            with TestClient(create_app(settings), raise_server_exceptions=False) as client:
                _wait_ready(client)
                yield Service(client, key)


def _wait_ready(client: TestClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:  # noqa: PLR2004
            return
        time.sleep(0.05)
    print(f"warning: not ready after {timeout_s}s: {client.get('/readyz').text}", file=sys.stderr)


# ----------------------------------------------------------------------------- summaries


def _get(body: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(body, dict) or key not in body:
            return None
        body = body[key]
    return body


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _short(text: str, limit: int = DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error(response: Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} {_short(response.text)}"
    if isinstance(body, dict):
        if "error" in body:  # Open Inference Protocol v2
            return f"{response.status_code} error: {_short(str(body['error']))}"
        code = body.get("code") or str(body.get("type", "-")).rsplit("/", 1)[-1]
        return f"{response.status_code} {code}: {_short(str(body.get('detail', body.get('title', '-'))))}"
    return f"{response.status_code} {_short(response.text)}"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


def _verdict(body: Any) -> str | None:
    """'indeterminate (score X > threshold Y)' when the answer says the input is outside."""
    validated = _get(body, "validated_input")
    if not isinstance(validated, dict):
        return None
    score, threshold = validated.get("score"), validated.get("threshold")
    above = isinstance(score, int | float) and isinstance(threshold, int | float) and score > threshold
    if validated.get("inside") is False:
        reasons = [r for r in validated.get("reasons") or [] if isinstance(r, dict)]
        why = "; ".join(f"{r.get('code')}: {_short(str(r.get('text', '')), 70)}" for r in reasons[:2])
        compare = ">" if above else "vs"
        return f"indeterminate (score {_number(score)} {compare} threshold {_number(threshold)}; {why or '-'})"
    return f"validated input (score {_number(score)} ≤ {_number(threshold)})"


def decision(response: Response, *, imputed: bool = False) -> str:
    """Status, label and the positive label's probability, or the error; never assumes a key."""
    if response.status_code >= 400:  # noqa: PLR2004 - HTTP's own boundary
        return _error(response)
    body = response.json()
    positive = _get(body, "decision", "positive_label")
    probability = _get(body, "probabilities", positive) if isinstance(positive, str) else None
    label = _text(_get(body, "decision", "label"))
    parts = [f"{response.status_code} {label}", f"p({_text(positive)})={_text(probability)}"]
    verdict = _verdict(body)
    if verdict is not None and verdict.startswith("indeterminate"):
        parts = [f"{response.status_code} {verdict}", f"p({_text(positive)})={_text(probability)}"]
    elif verdict is not None:
        parts.append(verdict)
    if imputed:
        parts.append(f"imputed={_imputed(body)}")
    return ", ".join(parts)


def _imputed(body: Any) -> str:
    names = _get(body, "input", "imputed")
    if names is None:
        return "-"
    return "[" + ",".join(str(n) for n in names) + "]"


def _used(body: Any, feature: str) -> str:
    """What the answer says went into the model for one feature (value, source, imputed)."""
    rows = _get(body, "input", "features")
    if rows is None:
        return "features used: -"
    for row in rows:
        if isinstance(row, dict) and row.get("name") == feature:
            source = row.get("source") or "-"
            return f"{feature}={_text(row.get('value'))} from {source}{' (imputed)' if row.get('imputed') else ''}"
    return f"{feature}: not listed"


def risk_summary(response: Response) -> str:
    """A FHIR RiskAssessment: each prediction's outcome (coded or text only), probability, basis."""
    if response.status_code >= 400:  # noqa: PLR2004
        return _error(response)
    body = response.json()
    predictions = []
    for prediction in _get(body, "prediction") or []:
        outcome = _get(prediction, "outcome") or {}
        text = _short(str(outcome.get("text", "-")), 60)
        coded = "coded" if outcome.get("coding") else "text only"
        percent = prediction.get("probabilityDecimal")
        predictions.append(f"{text} ({coded}, p={_text(percent)}%)")
    basis = len(_get(body, "basis") or [])
    return f"{response.status_code} RiskAssessment: {'; '.join(predictions) or '-'}; basis {basis} refs"


# ----------------------------------------------------------------------------- imaging inputs


def _testdata(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    if path is None:
        msg = f"pydicom-data's {name} is not installed"
        raise FileNotFoundError(msg)
    return Path(str(path)).read_bytes()


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _fresh_uids(ds: Dataset) -> None:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def extremity_as_chest() -> bytes:
    """RG3 (a real CR of an extremity) under a header that claims a PA chest CR."""
    ds = pydicom.dcmread(io.BytesIO(_testdata("RG3_UNCR.dcm")))
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_SOP_CLASS
    _fresh_uids(ds)
    return _encode(ds)


def phantom(seed: int, *, positive: bool) -> bytes:
    from training.dicom_studies import study_bytes  # noqa: PLC0415 - the checkout's, once --repo is on the path

    return study_bytes(seed=seed, positive=positive, rows=256)


def blank_with_phantom_header() -> bytes:
    """An in-distribution phantom's header over constant pixels (a detector left uncovered)."""
    ds = pydicom.dcmread(io.BytesIO(phantom(6, positive=False)))
    pixels = ds.pixel_array
    ds.PixelData = np.full_like(pixels, int(pixels.mean())).tobytes()
    _fresh_uids(ds)
    return _encode(ds)


def sr_summary(response: Response) -> str:
    """The SR's Finding code and whether any qualitative evaluation reads 'Present'."""
    if response.status_code >= 400:  # noqa: PLR2004
        return _error(response)
    sr = pydicom.dcmread(io.BytesIO(response.content))
    findings: list[str] = []
    present: list[str] = []
    numbers: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if item.get("ValueType") == "CODE" and "ConceptCodeSequence" in item:
                value = item.ConceptCodeSequence[0]
                if name is not None and name.CodeValue == "121071":  # DCM Finding
                    findings.append(f"{value.CodeMeaning} ({value.CodingSchemeDesignator} {value.CodeValue})")
                if value.CodeValue == "121053":  # DCM Present
                    present.append(str(name.CodeMeaning) if name is not None else "?")
            numeric = item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item
            if numeric and name is not None and any(w in name.CodeMeaning.lower() for w in ("probab", "score")):
                numbers.append(f"{name.CodeMeaning}={float(item.MeasuredValueSequence[0].NumericValue):.3f}")
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.get("ContentSequence", []))
    said = "Present: " + (", ".join(present) if present else "none")
    return f"{response.status_code} SR; Finding {', '.join(findings) or '-'}; {said}; {'; '.join(numbers) or '-'}"


# ----------------------------------------------------------------------------- FHIR inputs

WHEN = "2024-05-01T09:30:00Z"
LAB_DAY = "2024-04-30T07:15:00Z"
STRESS_DAY = "2024-04-24T10:05:00Z"


def _observation(
    oid: str,
    category: str,
    coding: list[dict[str, str]],
    text: str,
    when: str,
    **value: Any,
) -> dict[str, Any]:
    """An Observation as Epic/Cerner export it: meta, category, coded and textual code, issued."""
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"lastUpdated": when},
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": category}], "text": category.title()}],
        "code": {"coding": coding, "text": text},
        "subject": {"reference": "Patient/eXq1Gf3", "display": "Patient"},
        "effectiveDateTime": when,
        "issued": when,
        **value,
    }


def _quantity(value: float, ucum: str, display: str | None = None) -> dict[str, Any]:
    return {"valueQuantity": {"value": value, "unit": display or ucum, "system": UCUM, "code": ucum}}


def _loinc(code: str, display: str) -> list[dict[str, str]]:
    return [{"system": LOINC, "code": code, "display": display}]


def _site(code: str) -> list[dict[str, str]]:
    return [{"system": SITE, "code": code}]


def _site_coded(oid: str, code: str, value: str, when: str, category: str = "exam") -> dict[str, Any]:
    concept = {"valueCodeableConcept": {"coding": [{"system": SITE, "code": value}], "text": value}}
    return _observation(oid, category, _site(code), code, when, **concept)


def patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "eXq1Gf3",
        "identifier": [{"use": "usual", "system": "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14", "value": "E0000"}],
        "active": True,
        "name": [{"use": "official", "family": "Test", "given": ["Case"]}],
        "gender": "male",
        "birthDate": "1965-08-14",  # 58 years old on the observation dates
    }


def blood_pressure_single() -> dict[str, Any]:
    return _observation(
        "bp-sys", "vital-signs", _loinc("8480-6", "Systolic blood pressure"), "BP sys", WHEN, **_quantity(132, "mm[Hg]")
    )


def blood_pressure_panel() -> dict[str, Any]:
    """US Core blood pressure: the panel 85354-9 with systolic and diastolic as components."""
    panel = _observation("bp-panel", "vital-signs", _loinc("85354-9", "Blood pressure panel"), "BP", WHEN)
    panel["component"] = [
        {"code": {"coding": _loinc("8480-6", "Systolic blood pressure")}, **_quantity(132, "mm[Hg]", "mmHg")},
        {"code": {"coding": _loinc("8462-4", "Diastolic blood pressure")}, **_quantity(84, "mm[Hg]", "mmHg")},
    ]
    return panel


def cholesterol(*, si: bool = False, absent: bool = False) -> dict[str, Any]:
    if si:  # 5.79 mmol/L x 38.67 = 224 mg/dL, the same as the mass-concentration reading
        code = _loinc("14647-2", "Cholesterol [Moles/volume] in Serum or Plasma")
        return _observation("chol", "laboratory", code, "Cholesterol", LAB_DAY, **_quantity(5.79, "mmol/L"))
    code = _loinc("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma")
    if absent:
        reason = {"dataAbsentReason": {"coding": [{"system": ABSENT, "code": "not-performed"}], "text": "Not done"}}
        return _observation("chol", "laboratory", code, "Cholesterol", LAB_DAY, **reason)
    return _observation("chol", "laboratory", code, "Cholesterol", LAB_DAY, **_quantity(224, "mg/dL"))


def fasting_glucose(*, unit: bool = True) -> dict[str, Any]:
    code = _loinc("1558-6", "Fasting glucose [Mass/volume] in Serum or Plasma")
    value = _quantity(98, "mg/dL") if unit else {"valueQuantity": {"value": 98}}
    return _observation("glu", "laboratory", code, "Glucose fasting", LAB_DAY, **value)


def ward_heart_rate() -> dict[str, Any]:
    """A ward heart rate: US Core vital sign 8867-4, no method, 72/min."""
    code = _loinc("8867-4", "Heart rate")
    return _observation("hr-ward", "vital-signs", code, "Pulse", WHEN, **_quantity(72, "/min", "beats/minute"))


def stress_test_max_heart_rate() -> dict[str, Any]:
    """The peak heart rate of an exercise tolerance test: 8867-4 with the test as its method."""
    code = _loinc("8867-4", "Heart rate")
    obs = _observation("hr-stress", "procedure", code, "Peak HR", STRESS_DAY, **_quantity(150, "/min", "beats/min"))
    obs["method"] = {"coding": [{"system": SNOMED, "code": "165079009", "display": "Exercise tolerance test"}]}
    return obs


def stress_test_rest() -> list[dict[str, Any]]:
    """The exercise-test findings other than the peak rate, and the rest of the work-up."""
    return [
        _site_coded("exang", "exercise-induced-angina", "false", STRESS_DAY, "procedure"),
        _observation("st", "procedure", _site("st-depression"), "ST depression", STRESS_DAY, **_quantity(1.0, "mm")),
        _site_coded("slope", "st-slope", "flat", STRESS_DAY, "procedure"),
        _observation("ca", "imaging", _site("vessels-fluoroscopy"), "Vessels", STRESS_DAY, **_quantity(0, "1")),
        _site_coded("thal", "thallium-scan", "normal", STRESS_DAY, "imaging"),
    ]


def record(
    *,
    bp: Callable[[], dict[str, Any]] = blood_pressure_single,
    chol: dict[str, Any] | None = None,
    glucose: dict[str, Any] | None = None,
    heart_rate: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """A complete work-up of one 58-year-old man (13 of 13 features), one part swapped per case."""
    return [
        _site_coded("cp", "chest-pain-type", "non-anginal-pain", WHEN),
        bp(),
        chol or cholesterol(),
        glucose or fasting_glucose(),
        _site_coded("ecg", "resting-ecg", "lv-hypertrophy", WHEN, "procedure"),
        *(heart_rate if heart_rate is not None else [stress_test_max_heart_rate()]),
        *stress_test_rest(),
    ]


def bundle(observations: list[dict[str, Any]], *, searchset: bool = False) -> dict[str, Any]:
    resources = [patient(), *observations]
    entries: list[dict[str, Any]] = []
    for resource in resources:
        entry: dict[str, Any] = {"fullUrl": f"{BASE}/{resource['resourceType']}/{resource['id']}", "resource": resource}
        if searchset:  # Patient/$everything: the Patient matched, the rest included
            entry["search"] = {"mode": "match" if resource["resourceType"] == "Patient" else "include"}
        entries.append(entry)
    if searchset:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(entries),
            "link": [{"relation": "self", "url": f"{BASE}/Patient/eXq1Gf3/$everything"}],
            "entry": entries,
        }
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


# ----------------------------------------------------------------------------- the cases

Row = tuple[str, str]


def imaging_cases(repo: Path) -> list[Row]:
    rows: list[Row] = []
    with service(repo, (CXR,)) as svc:

        def predict(body: bytes, **headers: str) -> Response:
            return svc.client.post(
                f"/v1/models/{CXR}/predict", content=body, headers=svc.auth(**{"Content-Type": DICOM, **headers})
            )

        for number, name in enumerate(("RG1_UNCR", "RG1_UNCI", "RG1_J2KR", "RG1_J2KI"), start=1):
            rows.append((f"{number}. {name} (real chest CR) → JSON", decision(predict(_testdata(f"{name}.dcm")))))
        sr = predict(_testdata("RG1_UNCR.dcm"), Accept=DICOM)
        rows.append(("4b. RG1_UNCR → DICOM SR (Accept: application/dicom)", sr_summary(sr)))
        rows.append(("5. RG3_UNCR extremity relabelled CR/CHEST/PA", decision(predict(extremity_as_chest()))))
        rows.append(("6. blank image, phantom header", decision(predict(blank_with_phantom_header()))))
        rows.append(("7. in-distribution phantom (positive, seed 7)", decision(predict(phantom(7, positive=True)))))
        rows.append(("7b. in-distribution phantom (negative, seed 8)", decision(predict(phantom(8, positive=False)))))
        sr_phantom = predict(phantom(7, positive=True), Accept=DICOM)
        rows.append(("7c. phantom seed 7 → DICOM SR", sr_summary(sr_phantom)))
    return rows


def ehr_cases(repo: Path) -> list[Row]:
    rows: list[Row] = []
    with service(repo, (EHR,)) as svc:

        def predict(document: dict[str, Any], **headers: str) -> Response:
            body = json.dumps(document).encode()
            return svc.client.post(
                f"/v1/models/{EHR}/predict", content=body, headers=svc.auth(**{"Content-Type": FHIR_JSON, **headers})
            )

        def ehr(case: str, document: dict[str, Any], feature: str | None = None) -> None:
            response = predict(document)
            answer = decision(response, imputed=True)
            if feature is not None and response.status_code < 400:  # noqa: PLR2004
                answer += f", {_used(response.json(), feature)}"
            rows.append((case, answer))

        ehr("8a. complete record, HR = ward 8867-4 vital-signs 72/min", bundle(record(heart_rate=[ward_heart_rate()])))
        ehr("8b. same record without the ward HR", bundle(record(heart_rate=[])))
        ehr("8c. same record with the stress test's peak HR 150 (method 165079009)", bundle(record()), "thalach")
        fhir = predict(bundle(record(heart_rate=[ward_heart_rate()])), Accept=FHIR_JSON)
        rows.append(("8d. case 8a as FHIR (Accept: application/fhir+json)", risk_summary(fhir)))
        ehr("9. BP as US Core panel 85354-9 (components 8480-6/8462-4)", bundle(record(bp=blood_pressure_panel)))
        ehr("10. cholesterol with dataAbsentReason", bundle(record(chol=cholesterol(absent=True))))
        ehr("11. searchset Bundle (search.mode match/include)", bundle(record(), searchset=True))
        ehr("12. fasting glucose 1558-6 without a unit", bundle(record(glucose=fasting_glucose(unit=False))))
        ehr(
            "13. cholesterol SI LOINC 14647-2, 5.79 mmol/L (= 224 mg/dL)",
            bundle(record(chol=cholesterol(si=True))),
            "chol",
        )
        ehr("14. only age, sex, cp (10 of 13 missing)", bundle(record()[:1]))
        fhir = predict(bundle(record()[:1]), Accept=FHIR_JSON)
        rows.append(("14b. case 14 as FHIR (Accept: application/fhir+json)", risk_summary(fhir)))

        def infer(row: list[float]) -> Response:
            body = {"inputs": [{"name": "features", "shape": [1, 13], "datatype": "FP32", "data": row}]}
            return svc.client.post(f"/v2/models/{EHR}/infer", json=body, headers=svc.auth())

        valid = [58.0, 1.0, 3.0, 132.0, 224.0, 0.0, 2.0, 150.0, 0.0, 1.0, 2.0, 0.0, 3.0]
        for case, column, value in (("15. /v2 age 200", 0, 200.0), ("16. /v2 cp code 9", 2, 9.0)):
            row = copy.copy(valid)
            row[column] = value
            rows.append((case, v2_summary(infer(row))))
        rows.append(("17. /v2 valid row", v2_summary(infer(valid), provenance=True)))
    return rows


def v2_summary(response: Response, *, provenance: bool = False) -> str:
    if response.status_code >= 400:  # noqa: PLR2004
        return _error(response)
    body = response.json()
    outputs = {o.get("name"): o.get("data") for o in body.get("outputs", []) if isinstance(o, dict)}
    probabilities = outputs.get("probabilities") or []
    answer = f"{response.status_code} p(cad)={_text(float(probabilities[1]) if len(probabilities) > 1 else None)}"
    if provenance:
        sha = _get(body, "parameters", "model_sha256")
        flag = _get(body, "parameters", "not_for_clinical_use")
        answer += f", parameters.model_sha256={sha[:12] + '…' if isinstance(sha, str) else '-'}"
        answer += f", not_for_clinical_use={_text(flag)}"
    return answer


def _metric_samples(client: TestClient, prefix: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if float(value):
                samples[name] = float(value)
    return samples


PRODUCTION: dict[str, Any] = {
    "env": "production",
    "pacs_destination": "dimse://HOSPITALPACS@127.0.0.1:1",  # set, but nothing listens: counted, never sent
    "dimse_enabled": False,
    "study_settle_s": 0.2,
    **SECRETS,
}


def _readiness(svc: Service) -> str:
    ready = svc.client.get("/readyz")
    states = []
    for row in _get(ready.json(), "models") or []:
        state = f"{row.get('model')}@{row.get('version', '-')} {row.get('state')}"
        if row.get("error_code"):
            state += f" ({row['error_code']})"
        states.append(state)
    return f"/readyz {ready.status_code}: {'; '.join(states) or '-'}"


def _stow(svc: Service, instance: bytes) -> str:
    """STOW-RS one instance; if accepted, what became of its study (inferred, queued, withheld)."""
    boundary = "safety-cases"
    part = f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode() + instance + b"\r\n"
    stow = svc.client.post(
        "/dicomweb/studies",
        content=part + f"--{boundary}--\r\n".encode(),
        headers=svc.auth(**{"Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}'}),
    )
    answer = f"{stow.status_code}"
    with contextlib.suppress(ValueError, KeyError, TypeError):
        result = Dataset.from_json(stow.json())
        accepted = len(result.get("ReferencedSOPSequence", []))
        failed = [f"0x{int(f.FailureReason):04X}" for f in result.get("FailedSOPSequence", [])]
        answer += f" accepted={accepted} failed={','.join(failed) or '0'}"
        if accepted:
            answer += "; then: " + _study_outcome(svc.client)
    return answer


def _latest_version(repo: Path, model: str) -> str:
    return max((p.name for p in (repo / "models" / model).iterdir() if p.name.isdigit()), key=int)


def production_case(repo: Path) -> list[Row]:
    """The shipped models and settings in production: what is served, and what a STOW-RS gets.

    Then the operator's two deliberate steps: the CXR model acknowledged and a routing rule set
    (settings an older checkout does not know are ignored by its ``extra="ignore"``).
    """
    rows: list[Row] = []
    with service(repo, (CXR, EHR), **PRODUCTION) as svc:
        rows.append(("18a. production, shipped models + settings: served?", _readiness(svc)))
        rows.append(("18b. production STOW-RS of RG1", _stow(svc, _testdata("RG1_UNCR.dcm"))))
    route = json.dumps([{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": CXR}])
    acknowledged = [f"{CXR}@{_latest_version(repo, CXR)}"]
    extra = {"acknowledged_nonclinical_models": acknowledged, "imaging_routes": route}
    with service(repo, (CXR, EHR), **PRODUCTION, **extra) as svc:
        case = "18c. production, CXR acknowledged + routing rule: STOW-RS of a positive phantom"
        rows.append((case, _stow(svc, phantom(7, positive=True))))
    return rows


def _study_outcome(client: TestClient, timeout_s: float = 30.0) -> str:
    """Wait for the accepted study to be inferred, then say whether an SR was queued for the PACS."""
    deadline = time.monotonic() + timeout_s
    studies: dict[str, float] = {}
    while time.monotonic() < deadline:
        studies = _metric_samples(client, "medinfer_studies_total")
        if studies:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # let the outbox take what the study produced
    found = {**_metric_samples(client, "medinfer_studies_total")}
    found |= _metric_samples(client, "medinfer_pacs_outbox_events_total")
    found |= _metric_samples(client, "medinfer_results_withheld_total")
    if not found:
        return "no study outcome within 30 s"
    return "; ".join(
        f"{name.split('{')[0].removeprefix('medinfer_')}{_labels(name)}={v:g}" for name, v in found.items()
    )


def _labels(name: str) -> str:
    inside = name.partition("{")[2].rstrip("}")
    keep = [p for p in inside.split(",") if p.split("=")[0] in {"outcome", "event", "destination"}]
    return "{" + ",".join(keep) + "}" if keep else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repo", type=Path, required=True, help="the checkout whose app and models answer")
    args = parser.parse_args()
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo))
    import app  # noqa: PLC0415 - the checkout's, once --repo is on the path

    where = Path(app.__file__ or "").resolve()
    if repo not in where.parents:
        print(f"app resolves to {where}, not under {repo}: set PYTHONPATH={repo}", file=sys.stderr)
        return 2
    print(f"app from {where}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # the service's logs and the CLI's output
        rows = imaging_cases(repo) + ehr_cases(repo) + production_case(repo)
    print("| case | answer |")
    print("|---|---|")
    for case, answer in rows:
        print(f"| {case} | {answer.replace('|', '/')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
