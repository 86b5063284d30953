"""Open Inference Protocol v2 over HTTP, in process: shapes, binary extension, errors as {"error"}."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.domain import Scope
from tests.conftest import register


@pytest.fixture
def infer_key(migrated: Settings) -> str:
    return register(migrated, Scope.INFER, Scope.MODELS_READ, client_id="v2-client")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


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
    }


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
