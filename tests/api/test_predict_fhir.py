"""The EHR path on the real ehr-heart-disease model: FHIR Bundles and plain features in,
decisions with provenance out, as JSON or as a FHIR RiskAssessment."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.riskassessment import RiskAssessment

from app.config import Settings
from app.domain import Scope
from app.main import create_app
from tests.conftest import REPO_ROOT, register, wait_ready
from tests.support.fhir import FULL_VECTOR, WHEN, bundle, coded_obs, full_observations, patient, quantity_obs

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


def _post(client: TestClient, key: str, body: object, media: str = FHIR, **headers: str) -> object:
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
    }
    assert body["model"]["sha256"] == toml["versions"]["1"]["sha256"]
    assert body["model"]["not_for_clinical_use"] is True
    assert body["warnings"] == ["not for clinical use"]
    assert body["input"]["patient"] == "Patient/p1"
    assert body["input"]["imputed"] == []
    assert sorted(body["input"]["observations"]) == sorted(o["id"] for o in full_observations())


def test_the_latest_observation_wins(ehr: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = ehr
    older = quantity_obs("bp-old", "8480-6", 200, "mm[Hg]", "2023-01-01T08:00:00Z")
    observations = [older, *full_observations()]
    body = _post(client, key, bundle(*observations)).json()
    assert "bp-old" not in body["input"]["observations"]
    assert body["probabilities"]["cad"] == pytest.approx(float(_reference(FULL_VECTOR)[1]), abs=1e-6)


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
    observations.append(quantity_obs("hr", "8867-4", 999, "/min", WHEN))
    response = _post(client, key, bundle(*observations))
    assert response.status_code == 422
    assert "LOINC 8867-4" in response.json()["detail"]
    assert "999" not in response.text


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
    bad_type = bundle(*full_observations(), kind="searchset")
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
