"""Explanations over HTTP: opt-in, on the real reference models, audited and counted.

Records get exact Shapley contributions that add up to the answer's log-odds minus the
baseline's, in JSON and in the FHIR RiskAssessment. A model that declares no explanation of the
asked kind answers 422 naming what is missing.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.riskassessment import RiskAssessment
from PIL import Image

from app.config import Settings
from app.domain import Scope
from app.main import create_app
from tests.conftest import REPO_ROOT, register, wait_ready
from tests.support.fhir import bundle, full_observations
from training.dicom_studies import study_bytes

EHR = "ehr-heart-disease"
FHIR = "application/fhir+json"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, Settings]]:
    tmp = tmp_path_factory.mktemp("explain")
    repo = tmp / "models"
    for model in (EHR, "cxr-pneumonia"):
        shutil.copytree(REPO_ROOT / "models" / model, repo / model)
    settings = Settings(env="test", data_dir=tmp / "var", model_repository=repo)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDINFER_DATA_DIR", str(settings.data_dir))
        from app.__main__ import main as cli

        assert cli(["migrate"]) == 0
        key = register(settings, Scope.INFER, client_id="explain")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client, key, settings


def _post(client: TestClient, key: str, path: str, body: Any, media: str, accept: str = "application/json") -> Any:
    return client.post(
        path,
        content=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": media, "Accept": accept},
    )


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_a_record_explains_itself_with_contributions_that_add_up(
    served: tuple[TestClient, str, Settings],
) -> None:
    client, key, _ = served
    response = _post(client, key, f"/v1/models/{EHR}/predict?explain=true", bundle(*full_observations()), FHIR)
    assert response.status_code == 200, response.text
    answer = response.json()
    explanation = answer["explanation"]
    assert explanation["method"] == "shapley"
    assert explanation["space"] == "log_odds"
    total = sum(row["contribution"] for row in explanation["contributions"])
    assert total == pytest.approx(explanation["output_value"] - explanation["base_value"], abs=1e-6)
    assert explanation["output_value"] == pytest.approx(_logit(answer["probabilities"]["cad"]), abs=1e-4)
    assert {row["feature"] for row in explanation["contributions"]} == {f["name"] for f in answer["input"]["features"]}
    sizes = [abs(row["contribution"]) for row in explanation["contributions"]]
    assert sizes == sorted(sizes, reverse=True)


def test_the_fhir_answer_carries_the_contributions(served: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = served
    response = _post(client, key, f"/v1/models/{EHR}/predict?explain=true", bundle(*full_observations()), FHIR, FHIR)
    assert response.status_code == 200, response.text
    resource = response.json()
    RiskAssessment.model_validate(resource)
    contributions = [e for e in resource["extension"] if e["url"].endswith("feature-contribution")]
    assert len(contributions) == 13
    assert any("log-odds" in note["text"] for note in resource["note"])


def test_explanations_are_opt_in(served: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = served
    response = _post(client, key, f"/v1/models/{EHR}/predict", bundle(*full_observations()), FHIR)
    assert response.status_code == 200
    assert "explanation" not in response.json()


def test_an_explanation_asked_of_a_model_that_cannot_give_it_is_refused(
    served: tuple[TestClient, str, Settings],
) -> None:
    client, key, _ = served
    # The tabular model explains by Shapley values, not by an activation map: an image-style
    # explanation cannot be asked of it, and a record cannot be sent to the image model.
    response = _post(
        client, key, "/v1/models/cxr-pneumonia/predict?explain=true", {"features": {"age": 50}}, "application/json"
    )
    assert response.status_code in {400, 422}
    assert response.headers["content-type"].startswith("application/problem+json")


def test_explanations_are_audited_and_counted(served: tuple[TestClient, str, Settings]) -> None:
    client, key, settings = served
    response = _post(client, key, f"/v1/models/{EHR}/predict?explain=true", bundle(*full_observations()), FHIR)
    assert response.status_code == 200
    request_id = response.json()["request_id"]
    with sqlite3.connect(settings.data_dir / "medinfer.db") as db:
        details = [
            json.loads(detail)
            for rid, detail in db.execute("SELECT request_id, detail FROM audit_event WHERE action = 'inference'")
            if rid == request_id
        ]
    assert details, "the explained inference left no audit event under its request id"
    assert details[-1]["explanation"] == {"method": "shapley", "space": "log_odds"}
    metrics = client.get("/metrics").text
    assert re.search(
        r'medinfer_explanations_total\{method="shapley",model="ehr-heart-disease",version="1"\} [1-9]', metrics
    )


def _series(metrics: str, name: str, **labels: str) -> list[float]:
    found = []
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            found.append(float(line.rsplit(" ", 1)[1]))
    return found


def test_records_feed_the_drift_metrics_without_phi(served: tuple[TestClient, str, Settings]) -> None:
    """Enough records for the drift window: PSI per feature, imputation counts and the output
    histogram appear in /metrics, and no value sent (a marker age) appears there."""
    client, key, _ = served
    marker_age = 77.0  # at the training range's edge: the marker must not show up in any metric
    for i in range(210):
        features = {"age": marker_age if i % 7 == 0 else 40 + i % 30, "sex": "male", "cp": "asymptomatic"}
        features |= {"trestbps": 120 + i % 40, "chol": 200 + i % 80}
        response = _post(client, key, f"/v1/models/{EHR}/predict", {"features": features}, "application/json")
        assert response.status_code == 200, response.text
    metrics = client.get("/metrics").text
    psi = _series(metrics, "medinfer_feature_psi", model=EHR, feature="age")
    assert len(psi) == 1
    assert psi[0] > 0.25  # ages spread evenly over 40-69 are far from the training deciles
    assert _series(metrics, "medinfer_features_imputed_total", model=EHR, feature="thal")[0] >= 210
    assert _series(metrics, "medinfer_records_total", model=EHR)[0] >= 210
    assert _series(metrics, "medinfer_output_probability_count", model=EHR, label="cad")[0] >= 210
    assert "77.0" not in "\n".join(line for line in metrics.splitlines() if "medinfer_feature" in line)


def _dicom(client: TestClient, key: str, body: bytes, query: str = "", accept: str = "application/json") -> Any:
    return client.post(
        f"/v1/models/cxr-pneumonia/predict{query}",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/dicom", "Accept": accept},
    )


def test_an_image_explains_itself_with_an_activation_map_overlay(served: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = served
    phantom = study_bytes(seed=102, positive=True, rows=256)
    response = _dicom(client, key, phantom, "?explain=true")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["decision"]["label"] == "pneumonia"
    explanation = answer["explanation"]
    assert explanation["method"] == "cam"
    assert explanation["sop_instance_uid"] == answer["input"]["sop_instance_uids"][0]
    prefix = "data:image/png;base64,"
    assert explanation["overlay_png"].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png"][len(prefix) :]))) as image:
        assert image.size == (224, 224)
    png = _dicom(client, key, phantom, "?explain=true", accept="image/png")
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert "explanation" not in _dicom(client, key, phantom).json()


def test_the_png_overlay_must_be_asked_for_with_explain(served: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = served
    response = _dicom(client, key, study_bytes(seed=103, positive=False, rows=256), accept="image/png")
    assert response.status_code == 406
    assert "explain=true" in response.json()["detail"]


def test_a_record_model_cannot_explain_an_image(served: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = served
    response = client.post(
        f"/v1/models/{EHR}/predict?explain=true",
        content=study_bytes(seed=104, positive=False, rows=256),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"},
    )
    assert response.status_code in {400, 422}
