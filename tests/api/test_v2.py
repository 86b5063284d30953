"""Open Inference Protocol v2 over HTTP, in process: shapes, binary extension, errors as {"error"}."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from app.__main__ import main as cli
from app.config import Settings
from app.domain import Scope
from app.main import create_app
from tests.conftest import REPO_ROOT, register, wait_ready


@pytest.fixture
def infer_key(migrated: Settings) -> str:
    return register(migrated, Scope.INFER, Scope.MODELS_READ, client_id="v2-client")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def served_sha256(client: TestClient, key: str, model: str) -> str:
    """The sha256 the v1 catalogue cites for the one version serving."""
    (serving,) = client.get(f"/v1/models/{model}", headers=_auth(key)).json()["versions"]
    sha: str = serving["sha256"]
    return sha


def test_server_metadata_and_health(client: TestClient, infer_key: str) -> None:
    assert client.get("/v2").status_code == 401
    meta = client.get("/v2", headers=_auth(infer_key)).json()
    assert meta["name"] == "medinfer"
    assert "binary_tensor_data" in meta["extensions"]
    # Health probes stay open, like /livez and /readyz.
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/alpha/ready").status_code == 401
    assert client.get("/v2/models/alpha/ready", headers=_auth(infer_key)).status_code == 200
    not_served = client.get("/v2/models/beta/versions/1/ready", headers=_auth(infer_key))
    assert not_served.status_code == 400  # policy serves v2 only


def test_model_metadata(client: TestClient, infer_key: str) -> None:
    meta = client.get("/v2/models/beta", headers=_auth(infer_key)).json()
    assert meta == {
        "name": "beta",
        "versions": ["2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
        "parameters": {
            "model_sha256": served_sha256(client, infer_key, "beta"),
            "not_for_clinical_use": True,
            "intended_use": meta["parameters"]["intended_use"],
        },
    }
    assert meta["parameters"]["intended_use"]
    one = client.get("/v2/models/beta/versions/2", headers=_auth(infer_key)).json()
    assert one["parameters"] == meta["parameters"]


def test_json_infer_returns_the_model_outputs_and_echoes_the_id(client: TestClient, infer_key: str) -> None:
    body = {
        "id": "req-1",
        "inputs": [{"name": "features", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}],
    }
    response = client.post("/v2/models/alpha/infer", json=body, headers=_auth(infer_key))
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["id"] == "req-1"
    assert out["model_name"] == "alpha"
    assert out["model_version"] == "1"
    (tensor,) = out["outputs"]
    assert tensor["shape"] == [2, 2]
    probabilities = np.array(tensor["data"]).reshape(2, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_binary_infer_round_trips_raw_tensors(client: TestClient, infer_key: str) -> None:
    x = np.array([[1, 2, 3]], np.float32)
    header = json.dumps(
        {
            "inputs": [
                {"name": "features", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    response = client.post(
        "/v2/models/alpha/versions/1/infer",
        content=header + x.tobytes(),
        headers=_auth(infer_key) | {"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 8
    probabilities = np.frombuffer(response.content[length:], np.float32)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        (
            "/v2/models/gamma/infer",
            {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
            404,
            "gamma",
        ),
        (
            "/v2/models/alpha/versions/9/infer",
            {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
            404,
            "no version '9'",
        ),
        (
            "/v2/models/alpha/infer",
            {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
            422,
            "'features': dimension 1 is 4",
        ),
        (
            "/v2/models/alpha/infer",
            {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]},
            422,
            "datatype INT64, model expects FP32",
        ),
        (
            "/v2/models/alpha/infer",
            {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]},
            422,
            "2 elements for shape",
        ),
        (
            "/v2/models/alpha/infer",
            {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, "NaN", 2]}]},
            422,
            "NaN or Inf",
        ),
        (
            "/v2/models/alpha/infer",
            {"inputs": [{"name": "features", "shape": [1000000, 3], "datatype": "FP32", "data": []}]},
            413,
            "tensor cap",
        ),
        (
            "/v2/models/alpha/infer",
            {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
            422,
            "unknown input(s) ['x']",
        ),
    ],
)
def test_bad_inference_requests_get_v2_errors_naming_the_problem(
    client: TestClient, infer_key: str, path: str, body: dict[str, object], status: int, fragment: str
) -> None:
    response = client.post(path, json=body, headers=_auth(infer_key))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["error"]
    assert fragment in response.json()["error"]


def test_malformed_json_is_a_v2_400(client: TestClient, infer_key: str) -> None:
    response = client.post("/v2/models/alpha/infer", content=b"{nope", headers=_auth(infer_key))
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


def test_infer_needs_the_predict_scope(client: TestClient, reader_key: str) -> None:
    body = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    response = client.post("/v2/models/alpha/infer", json=body, headers=_auth(reader_key))
    assert response.status_code == 403
    assert response.json() == {"error": "scope 'infer' required"}


def test_infer_metrics_count_outcomes_by_model(client: TestClient, infer_key: str) -> None:
    body = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert client.post("/v2/models/alpha/infer", json=body, headers=_auth(infer_key)).status_code == 200
    text = client.get("/metrics").text
    assert 'medinfer_inference_requests_total{model="alpha",outcome="ok",version="1"} 1.0' in text
    assert 'medinfer_inference_batch_size_count{model="alpha",version="1"} 1.0' in text


# The ehr-heart-disease model's declared feature contract on /v2 tensors, and provenance.

EHR = "ehr-heart-disease"
#: age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak, slope, ca, thal
VALID_ROW = [63.0, 1, 1, 145, 233, 1, 2, 150, 0, 2.3, 3, 0, 6]


@pytest.fixture
def ehr_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, str]]:
    repo = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models" / EHR, repo / EHR)
    settings = Settings(env="test", data_dir=tmp_path / "var", model_repository=repo)
    monkeypatch.setenv("MEDINFER_DATA_DIR", str(settings.data_dir))
    assert cli(["migrate"]) == 0
    key = register(settings, Scope.INFER, Scope.MODELS_READ, client_id="v2-ehr")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client, key


def _ehr_body(*rows: Sequence[object]) -> dict[str, object]:
    flat = [value for row in rows for value in row]
    return {"inputs": [{"name": "features", "shape": [len(rows), 13], "datatype": "FP32", "data": flat}]}


def _with(column: int, value: object) -> list[object]:
    row: list[object] = list(VALID_ROW)
    row[column] = value
    return row


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (_with(0, 200), "column 0 (age): value outside the plausible range [18, 110]"),
        (_with(2, 9), "column 2 (cp): value is not one of the declared codes [1, 2, 3, 4]"),
        (_with(0, "NaN"), "column 0 (age): NaN (missing) is not accepted: the feature is required"),
        (_with(4, "Infinity"), "column 4 (chol): Inf is never a valid feature value"),
        (_with(7, "-Infinity"), "column 7 (thalach): Inf is never a valid feature value"),
    ],
    ids=["age-200", "cp-code-9", "nan-required", "inf", "minus-inf"],
)
def test_v2_tensors_meet_the_models_feature_contract(
    ehr_client: tuple[TestClient, str], row: list[object], fragment: str
) -> None:
    client, key = ehr_client
    response = client.post(f"/v2/models/{EHR}/infer", json=_ehr_body(VALID_ROW, row), headers=_auth(key))
    assert response.status_code == 422, response.text  # the status of every misfit tensor
    assert list(response.json()) == ["error"]
    error = response.json()["error"]
    assert f"row 1, {fragment}" in error
    assert "200" not in error
    assert "9." not in error


def test_nan_in_an_imputed_feature_is_answered_with_provenance(ehr_client: tuple[TestClient, str]) -> None:
    client, key = ehr_client
    response = client.post(f"/v2/models/{EHR}/infer", json=_ehr_body(VALID_ROW, _with(4, "NaN")), headers=_auth(key))
    assert response.status_code == 200, response.text
    out = response.json()
    (tensor,) = out["outputs"]
    probabilities = np.array(tensor["data"]).reshape(2, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert out["parameters"] == {
        "model_sha256": served_sha256(client, key, EHR),
        "not_for_clinical_use": True,
        "intended_use": client.get(f"/v1/models/{EHR}", headers=_auth(key)).json()["intended_use"],
    }


def test_a_valid_row_gets_the_reference_output_and_the_models_provenance(ehr_client: tuple[TestClient, str]) -> None:
    client, key = ehr_client
    response = client.post(f"/v2/models/{EHR}/infer", json=_ehr_body(VALID_ROW), headers=_auth(key))
    assert response.status_code == 200, response.text
    out = response.json()
    session = ort.InferenceSession(
        str(REPO_ROOT / "models" / EHR / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = session.run(None, {"features": np.asarray([VALID_ROW], np.float32)})[0]
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]), np.ravel(expected), rtol=1e-6)
    sha = served_sha256(client, key, EHR)
    assert sha == hashlib.sha256((REPO_ROOT / "models" / EHR / "1" / "model.onnx").read_bytes()).hexdigest()
    assert out["parameters"]["model_sha256"] == sha
    assert out["parameters"]["not_for_clinical_use"] is True
    metadata = client.get(f"/v2/models/{EHR}", headers=_auth(key)).json()
    assert metadata["parameters"] == out["parameters"]


def test_binary_extension_answers_carry_provenance_in_their_json_header(ehr_client: tuple[TestClient, str]) -> None:
    client, key = ehr_client
    x = np.asarray([VALID_ROW], np.float32)
    header = json.dumps(
        {
            "inputs": [
                {"name": "features", "shape": [1, 13], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    response = client.post(
        f"/v2/models/{EHR}/versions/1/infer",
        content=header + x.tobytes(),
        headers=_auth(key) | {"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    assert meta["parameters"]["model_sha256"] == served_sha256(client, key, EHR)
    assert meta["parameters"]["not_for_clinical_use"] is True
    assert np.frombuffer(response.content[length:], np.float32).sum() == pytest.approx(1.0, abs=1e-6)

    bad = x.copy()
    bad[0, 0] = 200.0
    refused = client.post(
        f"/v2/models/{EHR}/versions/1/infer",
        content=header + bad.tobytes(),
        headers=_auth(key) | {"Inference-Header-Content-Length": str(len(header))},
    )
    assert refused.status_code == 422
    assert "row 0, column 0 (age): value outside the plausible range" in refused.json()["error"]
