"""The EHR path on the real ehr-heart-disease model: FHIR Bundles and plain features in,
decisions with provenance out, as JSON or as a FHIR RiskAssessment."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.riskassessment import RiskAssessment

from app.config import Settings
from app.domain import Scope
from app.main import create_app
from tests.conftest import REPO_ROOT, register, wait_ready
from tests.support.fhir import (
    FULL_VECTOR,
    NO_CAD_BIRTH,
    NO_CAD_VECTOR,
    WHEN,
    absent_obs,
    blood_pressure_panel,
    bundle,
    coded_obs,
    everything,
    exercise_max_heart_rate,
    full_observations,
    lab_obs,
    no_cad_observations,
    patient,
    quantity_obs,
    site_quantity_obs,
    vital_heart_rate,
    without,
)

MODEL = "ehr-heart-disease"
FHIR = "application/fhir+json"


@pytest.fixture
def ehr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, str, Settings]]:
    repo = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)
    settings = Settings(env="test", data_dir=tmp_path / "var", model_repository=repo)
    monkeypatch.setenv("MEDINFER_DATA_DIR", str(settings.data_dir))
    from app.__main__ import main as cli

    assert cli(["migrate"]) == 0
    key = register(settings, Scope.INFER, Scope.AUDIT_READ, client_id="his")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client, key, settings


def _session() -> ort.InferenceSession:
    return ort.InferenceSession(
        str(REPO_ROOT / "models" / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _reference(vector: list[float]) -> np.ndarray:
    return np.asarray(_session().run(None, {"features": np.asarray([vector], np.float32)})[0][0])


def _post(client: TestClient, key: str, body: object, media: str = FHIR, **headers: str) -> Any:
    return client.post(
        f"/v1/models/{MODEL}/predict",
        content=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": media, **headers},
    )


def test_a_full_bundle_predicts_with_provenance(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    response = _post(client, key, bundle(*full_observations()))
    assert response.status_code == 200, response.text
    body = response.json()
    expected = _reference(FULL_VECTOR)
    assert body["probabilities"]["cad"] == pytest.approx(float(expected[1]), abs=1e-6)
    toml = tomllib.loads((REPO_ROOT / "models" / MODEL / "model.toml").read_text())
    threshold = toml["thresholds"]["default"]
    assert body["decision"] == {
        "label": "cad" if expected[1] >= threshold else "no_cad",
        "positive": bool(expected[1] >= threshold),
        "positive_label": "cad",
        "threshold": threshold,
        "operating_point": "default",
        "indeterminate": False,
    }
    assert body["model"]["sha256"] == toml["versions"]["1"]["sha256"]
    assert body["model"]["not_for_clinical_use"] is True
    assert body["warnings"] == ["not for clinical use"]
    assert body["input"]["patient"] == "Patient/p1"
    assert body["input"]["imputed"] == []
    assert sorted(body["input"]["observations"]) == sorted(o["id"] for o in full_observations())
    used = {u["name"]: u for u in body["input"]["features"]}
    assert [u["name"] for u in body["input"]["features"]] == toml["preprocessing"]["feature_order"]
    assert used["age"] == {"name": "age", "value": 63, "unit": "a", "source": "Patient/p1", "imputed": False}
    assert used["thalach"] == {
        "name": "thalach",
        "value": 150,
        "unit": "/min",
        "source": "Observation/hr",
        "imputed": False,
    }
    assert used["fbs"] == {"name": "fbs", "value": 1, "unit": None, "source": "Observation/glu", "imputed": False}


def test_the_latest_observation_wins(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    older = quantity_obs("bp-old", "8480-6", 200, "mm[Hg]", "2024-02-01T08:00:00Z")  # within the look-back
    observations = [older, *full_observations()]
    body = _post(client, key, bundle(*observations)).json()
    assert "bp-old" not in body["input"]["observations"]
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(FULL_VECTOR)[1]), abs=1e-6)


def _used(body: dict[str, Any], name: str) -> dict[str, Any]:
    (use,) = [u for u in body["input"]["features"] if u["name"] == name]
    return use  # type: ignore[no-any-return]


def test_readings_older_than_the_look_back_are_ignored_and_the_one_used_is_named(
    ehr: tuple[TestClient, str, Settings],
) -> None:
    """model.toml: most recent reading within 365 days of the newest reading in the record."""
    client, key, _ = ehr
    observations = without(full_observations(), "bp", "chol")
    observations += [
        quantity_obs("bp-2022", "8480-6", 180, "mm[Hg]", "2022-03-01T08:00:00Z"),  # outside: ignored
        quantity_obs("bp-2024-03", "8480-6", 145, "mm[Hg]", "2024-03-11T08:00:00Z"),  # used
        quantity_obs("bp-2024-01", "8480-6", 170, "mm[Hg]", "2024-01-20T08:00:00Z"),  # older within
        lab_obs(
            "chol-2021", "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", 300, "mg/dL", "2021-06-01T07:00:00Z"
        ),
    ]
    response = _post(client, key, bundle(*observations))
    assert response.status_code == 200, response.text
    body = response.json()
    assert _used(body, "trestbps") == {
        "name": "trestbps", "value": 145, "unit": "mm[Hg]", "source": "Observation/bp-2024-03", "imputed": False,
    }  # fmt: skip
    assert _used(body, "chol") == {"name": "chol", "value": 240, "unit": "mg/dL", "source": None, "imputed": True}
    assert body["input"]["imputed"] == ["chol"]
    assert "bp-2022" not in body["input"]["observations"]
    vector = [np.nan if i == 4 else v for i, v in enumerate(FULL_VECTOR)]
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(vector)[1]), abs=1e-6)


def test_a_ward_heart_rate_never_fills_the_exercise_maximum(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    pat = patient(birth=NO_CAD_BIRTH)
    plain = _post(client, key, bundle(*no_cad_observations(), pat=pat)).json()
    ward = _post(client, key, bundle(*no_cad_observations(), vital_heart_rate("hr-ward", 72, WHEN), pat=pat))
    assert ward.status_code == 200, ward.text
    body = ward.json()
    assert body["decision"]["label"] == plain["decision"]["label"] == "no_cad"
    assert body["probabilities"] == plain["probabilities"]
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(NO_CAD_VECTOR)[1]), abs=1e-6)
    assert body["input"]["imputed"] == ["thalach"]
    assert _used(body, "thalach") == {"name": "thalach", "value": 143, "unit": "/min", "source": None, "imputed": True}
    assert "hr-ward" not in body["input"]["observations"]
    # What the old behaviour did: the ward rate read as the exercise maximum flips the decision.
    as_if_used = [72 if i == 7 else v for i, v in enumerate(NO_CAD_VECTOR)]
    assert float(_reference(as_if_used)[1]) >= body["decision"]["threshold"]


@pytest.mark.parametrize("form", ["method", "site-code"])
def test_the_exercise_test_maximum_is_used(ehr: tuple[TestClient, str, Settings], form: str) -> None:
    client, key, _ = ehr
    if form == "method":
        peak = exercise_max_heart_rate("hr-peak", 150, WHEN)
    else:
        peak = site_quantity_obs("hr-peak", "max-heart-rate-exercise-test", 150, "/min", WHEN)
    observations = [*without(full_observations(), "hr"), vital_heart_rate("hr-ward", 72, WHEN), peak]
    body = _post(client, key, bundle(*observations)).json()
    assert _used(body, "thalach")["source"] == "Observation/hr-peak"
    assert body["input"]["imputed"] == []
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(FULL_VECTOR)[1]), abs=1e-6)


def test_a_us_core_blood_pressure_panel_fills_the_systolic_feature(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    observations = [*without(full_observations(), "bp"), blood_pressure_panel("bp-panel", 145, 92, WHEN)]
    response = _post(client, key, bundle(*observations))
    assert response.status_code == 200, response.text
    body = response.json()
    assert _used(body, "trestbps")["source"] == "Observation/bp-panel"
    assert body["input"]["imputed"] == []
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(FULL_VECTOR)[1]), abs=1e-6)


def test_a_patient_everything_searchset_is_read(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    response = _post(client, key, everything(*full_observations()))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input"]["imputed"] == []
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(FULL_VECTOR)[1]), abs=1e-6)
    assert _used(body, "sex")["source"] == "Patient/p1"


@pytest.mark.parametrize(("where", "reason"), [("observation", "not-performed"), ("component", "error")])
def test_a_data_absent_reason_counts_as_missing(ehr: tuple[TestClient, str, Settings], where: str, reason: str) -> None:
    client, key, _ = ehr
    if where == "observation":
        observations = [*without(full_observations(), "bp"), absent_obs("bp-absent", "8480-6", reason, WHEN)]
    else:
        observations = [*without(full_observations(), "bp"), blood_pressure_panel("bp", None, 88, WHEN, absent=reason)]
    response = _post(client, key, bundle(*observations))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input"]["imputed"] == ["trestbps"]
    assert _used(body, "trestbps")["imputed"] is True
    vector = [np.nan if i == 3 else v for i, v in enumerate(FULL_VECTOR)]
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(vector)[1]), abs=1e-6)


def test_a_data_absent_reason_on_a_required_feature_is_refused(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    chest_pain = coded_obs("cp", "chest-pain-type", "x", WHEN)
    del chest_pain["valueCodeableConcept"]
    chest_pain["dataAbsentReason"] = {"coding": [{"code": "asked-unknown"}]}
    response = _post(client, key, bundle(chest_pain, *without(full_observations(), "cp")))
    assert response.status_code == 422
    assert response.json()["code"] == "missing-features"
    assert response.json()["detail"] == "missing required features: chest-pain-type (cp)"


def test_si_unit_cholesterol_gives_the_mg_per_dl_answer(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    si = lab_obs("chol-si", "14647-2", "Cholesterol [Moles/volume] in Serum or Plasma", 233 / 38.67, "mmol/L", WHEN)
    glucose = lab_obs("glu-si", "14771-0", "Fasting glucose [Moles/volume] in Serum or Plasma", 8.3, "mmol/L", WHEN)
    observations = [*without(full_observations(), "chol", "glu"), si, glucose]
    body = _post(client, key, bundle(*observations)).json()
    assert _used(body, "chol")["source"] == "Observation/chol-si"
    assert _used(body, "chol")["value"] == pytest.approx(233)
    assert _used(body, "fbs") == {
        "name": "fbs",
        "value": 1,
        "unit": None,
        "source": "Observation/glu-si",
        "imputed": False,
    }
    mg_dl = _post(client, key, bundle(*full_observations())).json()
    assert body["probabilities"]["cad"] == pytest.approx(mg_dl["probabilities"]["cad"], abs=1e-6)
    assert body["decision"] == mg_dl["decision"]


@pytest.mark.parametrize(
    ("drop", "quantity", "named"),
    [
        ("glu", quantity_obs("glu", "1558-6", 150, "mg/dL", WHEN), "LOINC 1558-6 (fbs)"),
        ("st", site_quantity_obs("st", "st-depression", 2.3, "mm", WHEN), "st-depression (oldpeak)"),
    ],
)
def test_a_quantity_without_a_unit_is_refused(
    ehr: tuple[TestClient, str, Settings], drop: str, quantity: dict[str, object], named: str
) -> None:
    client, key, _ = ehr
    quantity["valueQuantity"] = {"value": quantity["valueQuantity"]["value"]}  # type: ignore[index]
    response = _post(client, key, bundle(*without(full_observations(), drop), quantity))
    assert response.status_code == 422
    assert response.json()["code"] == "invalid-request"
    assert response.json()["detail"].startswith(f"{named}: the quantity has no unit")


def test_cholesterol_in_mmol_per_litre_is_converted(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    observations = [o for o in full_observations() if o["id"] != "chol"]
    observations.append(quantity_obs("chol", "2093-3", 233 / 38.67, "mmol/L", WHEN))
    body = _post(client, key, bundle(*observations)).json()
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(FULL_VECTOR)[1]), abs=1e-5)


def test_an_unknown_unit_is_refused_naming_the_loinc_code(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    observations = [o for o in full_observations() if o["id"] != "chol"]
    observations.append(quantity_obs("chol", "2093-3", 2.33, "g/L", WHEN))
    response = _post(client, key, bundle(*observations))
    assert response.status_code == 422
    assert "LOINC 2093-3" in response.json()["detail"]
    assert "send one of: mg/dL, mmol/L" in response.json()["detail"]
    assert "g/L " not in response.json()["detail"]  # the record's own text is not echoed


def test_missing_required_features_are_listed(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    pat = patient()
    del pat["birthDate"]
    response = _post(client, key, bundle(*[o for o in full_observations() if o["id"] != "cp"], pat=pat))
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "missing-features"
    assert "Patient.birthDate (age)" in body["detail"]
    assert "chest-pain-type (cp)" in body["detail"]


def test_missing_optional_features_are_imputed_and_flagged(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    observations = [o for o in full_observations() if o["id"] not in {"chol", "ca"}]
    body = _post(client, key, bundle(*observations)).json()
    assert body["input"]["imputed"] == ["chol", "ca"]
    vector = [np.nan if i in {4, 11} else v for i, v in enumerate(FULL_VECTOR)]
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(vector)[1]), abs=1e-6)


def test_an_observation_of_another_patient_is_refused(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    stranger = quantity_obs("bp2", "8480-6", 120, "mm[Hg]", WHEN, patient="Patient/p2")
    response = _post(client, key, bundle(*full_observations(), stranger))
    assert response.status_code == 422
    assert "not the Bundle's Patient" in response.json()["detail"]


def test_implausible_values_are_refused_without_echoing_them(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    observations = [o for o in full_observations() if o["id"] != "hr"]
    observations.append(exercise_max_heart_rate("hr", 999, WHEN))
    response = _post(client, key, bundle(*observations))
    assert response.status_code == 422
    assert response.json()["detail"] == "LOINC 8867-4 (thalach): value outside the plausible range [50, 230]"
    assert "999" not in response.text


_OUT_OF_RANGE = ": value outside the plausible range "


@pytest.mark.parametrize(
    ("replace", "observation", "detail"),
    [
        ("bp", blood_pressure_panel("bp", 400, 90, WHEN), "LOINC 8480-6 (trestbps)" + _OUT_OF_RANGE + "[60, 260]"),
        (
            "glu",
            quantity_obs("glu", "1558-6", 5000, "mg/dL", WHEN),
            "LOINC 1558-6 (fbs)" + _OUT_OF_RANGE + "[10, 2000]",
        ),
        (
            "ca",
            site_quantity_obs("ca", "vessels-fluoroscopy", 4, "1", WHEN),
            "vessels-fluoroscopy (ca)" + _OUT_OF_RANGE + "[0, 3]",
        ),
    ],
)
def test_every_feature_has_a_plausibility_range(
    ehr: tuple[TestClient, str, Settings], replace: str, observation: dict[str, object], detail: str
) -> None:
    client, key, _ = ehr
    response = _post(client, key, bundle(*without(full_observations(), replace), observation))
    assert response.status_code == 422
    assert response.json()["code"] == "invalid-request"
    assert response.json()["detail"] == detail
    toml = tomllib.loads((REPO_ROOT / "models" / MODEL / "model.toml").read_text())
    assert all("valid_range" in feature for feature in toml["preprocessing"]["features"])


def test_a_risk_assessment_uses_percentages_and_cites_the_model(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    response = _post(client, key, bundle(*full_observations()), Accept=FHIR)
    assert response.status_code == 200
    assert response.headers["content-type"] == FHIR
    resource = RiskAssessment.model_validate(response.json())
    expected = _reference(FULL_VECTOR)
    by_label = {p.outcome.text: float(p.probabilityDecimal) for p in resource.prediction}
    assert by_label["cad"] == pytest.approx(float(expected[1]) * 100, abs=1e-3)
    assert by_label["cad"] + by_label["no_cad"] == pytest.approx(100.0, abs=1e-3)
    assert resource.subject.reference == "Patient/p1"
    assert resource.status == "preliminary"
    device = response.json()["contained"][0]
    assert device["resourceType"] == "Device"
    toml = tomllib.loads((REPO_ROOT / "models" / MODEL / "model.toml").read_text())
    assert device["identifier"][0]["value"] == toml["versions"]["1"]["sha256"]
    assert "Not for clinical use." in [n.text for n in resource.note]


def test_plain_json_features_give_the_same_answer(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    features = {
        "age": 63, "sex": "male", "cp": "typical-angina", "trestbps": 145, "chol": 233, "fbs": 1, "restecg": 2,
        "thalach": 150, "exang": 0, "oldpeak": 2.3, "slope": 3, "ca": 0, "thal": 6,
    }  # fmt: skip
    body = _post(client, key, {"features": features}, media="application/json").json()
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(FULL_VECTOR)[1]), abs=1e-6)
    assert body["input"]["kind"] == "features"
    assert {u["source"] for u in body["input"]["features"]} == {"request"}


def test_operating_points_change_the_threshold(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    response = client.post(
        f"/v1/models/{MODEL}/predict?operating_point=youden",
        content=json.dumps(bundle(*full_observations())).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": FHIR},
    )
    toml = tomllib.loads((REPO_ROOT / "models" / MODEL / "model.toml").read_text())
    assert response.json()["decision"]["threshold"] == toml["thresholds"]["operating_points"]["youden"]["threshold"]
    unknown = client.post(
        f"/v1/models/{MODEL}/predict?operating_point=nope",
        content=json.dumps(bundle(*full_observations())).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": FHIR},
    )
    assert unknown.status_code == 422


@pytest.mark.parametrize(
    ("media", "accept", "status"),
    [("text/plain", "application/json", 415), (FHIR, "application/xml", 406)],
)
def test_wrong_media_types_are_refused(
    ehr: tuple[TestClient, str, Settings], media: str, accept: str, status: int
) -> None:
    client, key, _ = ehr
    response = _post(client, key, bundle(*full_observations()), media=media, Accept=accept)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"


def test_malformed_bundles_get_4xx(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    assert _post(client, key, {"resourceType": "Patient"}).status_code == 422
    bad_type = bundle(*full_observations(), kind="history")
    assert _post(client, key, bad_type).status_code == 422
    broken = client.post(
        f"/v1/models/{MODEL}/predict", content=b"{", headers={"Authorization": f"Bearer {key}", "Content-Type": FHIR}
    )
    assert broken.status_code == 400
    two = bundle(*full_observations())
    two["entry"].append({"resource": patient() | {"id": "p2"}})
    assert "exactly one Patient" in _post(client, key, two).json()["detail"]
    wrong = bundle(coded_obs("cp", "chest-pain-type", "stabbing", WHEN), *full_observations()[1:])
    assert "code not in the model's code table" in _post(client, key, wrong).json()["detail"]


def test_the_audit_event_holds_a_pseudonym_never_the_mrn(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, settings = ehr
    assert _post(client, key, bundle(*full_observations())).status_code == 200
    events = client.get("/v1/audit/events", params={"action": "inference"}, headers={"Authorization": f"Bearer {key}"})
    (event,) = events.json()["events"]
    assert event["patient_pseudonym"] is not None
    assert len(event["patient_pseudonym"]) == 64
    with sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///")) as db:
        dump = "\n".join(db.iterdump())
    assert "MRN-0042" not in dump
    assert "Doe" not in dump


def test_prediction_metrics_count_labels_and_time_preprocessing(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    label = _post(client, key, bundle(*full_observations())).json()["decision"]["label"]
    text = client.get("/metrics").text
    assert f'medinfer_predictions_total{{label="{label}",model="{MODEL}",version="1"}} 1.0' in text
    assert f'medinfer_inference_preprocess_seconds_count{{model="{MODEL}",version="1"}} 1.0' in text
    assert "medinfer_gpu_" not in text or "medinfer_gpu_utilization_ratio" in text


@pytest.mark.parametrize("birth", ["1961", "1961-04"])
def test_a_partial_birth_date_is_refused_not_guessed(ehr: tuple[TestClient, str, Settings], birth: str) -> None:
    client, key, _ = ehr
    response = _post(client, key, bundle(*full_observations(), pat=patient(birth=birth)))
    assert response.status_code == 422, response.text
    assert "Patient.birthDate must be a full date" in response.json()["detail"]


@pytest.mark.parametrize("when", ["2024", "2024-06"])
def test_a_partial_observation_time_is_refused_not_ordered_by_guess(
    ehr: tuple[TestClient, str, Settings], when: str
) -> None:
    # A partial time would otherwise sort as the oldest reading and lose to an older full one.
    client, key, _ = ehr
    observations = full_observations()
    observations.append(quantity_obs("bp-later", "8480-6", 180, "mm[Hg]", when))
    response = _post(client, key, bundle(*observations))
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == (
        "Observation/bp-later: effective time must be a full date or date-time, not a year or month"
    )


def test_an_unknown_element_is_named_by_its_place_not_by_its_key(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    pat = patient() | {"Jane Doe MRN-0042": "x"}
    response = _post(client, key, bundle(*full_observations(), pat=pat))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "unknown element under entry.0.resource" in detail
    assert "Jane" not in detail
    assert "MRN-0042" not in detail


def test_unknown_feature_names_are_counted_not_repeated(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    features = {"age": 63, "Jane Doe MRN-0042": 1, "another": 2}
    response = _post(client, key, {"features": features}, media="application/json")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("2 unknown feature name(s); the model takes [")
    assert "Jane" not in detail
