"""Existing Triton/KServe clients work unchanged: the real `tritonclient[http]` against a real server."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import REPO_ROOT
from tests.integration.conftest import Served, base_env, medinfer, serve

pytestmark = pytest.mark.integration

EHR = "ehr-heart-disease"
#: age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak, slope, ca, thal
EHR_ROW = [63, 1, 1, 145, 233, 1, 2, 150, 0, 2.3, 3, 0, 6]


@pytest.fixture
def server(tmp_path: Path, model_repo: Path) -> Iterator[tuple[Served, dict[str, str]]]:
    shutil.copytree(REPO_ROOT / "models" / EHR, model_repo / EHR)
    env = base_env(tmp_path, model_repo, None)
    assert medinfer(env, "migrate").returncode == 0
    registered = medinfer(
        env, "clients", "register", "--client-id", "triton", "--scope", "infer", "--scope", "models:read"
    )
    key = json.loads(registered.stdout)["api_key"]
    served = serve(env, tmp_path / "serve.log")
    try:
        yield served, {"Authorization": f"Bearer {key}"}
    finally:
        served.stop()


def _expected(model_repo: Path, name: str, version: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_repo / name / version / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"features": x})[0])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_in_json_and_binary_modes(
    server: tuple[Served, dict[str, str]], model_repo: Path, binary: bool
) -> None:
    served, headers = server
    client = triton.InferenceServerClient(url=served.base_url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("beta", headers=headers)
        metadata = client.get_model_metadata("beta", headers=headers)
        assert metadata["versions"] == ["2"]

        x = np.array([[0.5, -1.0, 2.0], [3.0, 0.0, -0.5]], dtype=np.float32)
        tensor = triton.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer("beta", [tensor], outputs=[wanted], request_id="tc-1", headers=headers)
        assert result.get_response()["id"] == "tc-1"
        assert result.get_response()["model_version"] == "2"
        got = result.as_numpy("probabilities")
        np.testing.assert_allclose(got, _expected(model_repo, "beta", "2", x), rtol=1e-6, atol=1e-7)
    finally:
        client.close()


def test_tritonclient_sees_protocol_errors(server: tuple[Served, dict[str, str]]) -> None:
    served, headers = server
    client = triton.InferenceServerClient(url=served.base_url.removeprefix("http://"))
    try:
        bad = triton.InferInput("features", [1, 4], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 4), np.float32), binary_data=True)
        with pytest.raises(InferenceServerException, match="dimension 1 is 4, model expects 3"):
            client.infer("alpha", [bad], headers=headers)
        good = triton.InferInput("features", [1, 3], "FP32")
        good.set_data_from_numpy(np.zeros((1, 3), np.float32))
        with pytest.raises(InferenceServerException, match="'gamma' is not in the repository"):
            client.infer("gamma", [good], headers=headers)
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_reads_the_models_provenance_from_the_response_parameters(
    server: tuple[Served, dict[str, str]], binary: bool
) -> None:
    served, headers = server
    sha256 = hashlib.sha256((REPO_ROOT / "models" / EHR / "1" / "model.onnx").read_bytes()).hexdigest()
    client = triton.InferenceServerClient(url=served.base_url.removeprefix("http://"))
    try:
        x = np.array([EHR_ROW], dtype=np.float32)
        tensor = triton.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer(EHR, [tensor], outputs=[wanted], headers=headers)
        parameters = result.get_response()["parameters"]
        assert parameters["model_sha256"] == sha256
        assert parameters["not_for_clinical_use"] is True
        assert parameters["intended_use"]
        assert result.as_numpy("probabilities").sum() == pytest.approx(1.0, abs=1e-6)
        assert client.get_model_metadata(EHR, headers=headers)["parameters"] == parameters
    finally:
        client.close()


def test_tritonclient_sees_the_feature_contract_name_the_column(server: tuple[Served, dict[str, str]]) -> None:
    served, headers = server
    client = triton.InferenceServerClient(url=served.base_url.removeprefix("http://"))
    try:
        row = list(EHR_ROW)
        row[0] = 200
        tensor = triton.InferInput("features", [1, 13], "FP32")
        tensor.set_data_from_numpy(np.array([row], dtype=np.float32), binary_data=True)
        with pytest.raises(
            InferenceServerException, match=r"column 0 \(age\): value outside the plausible range"
        ) as caught:
            client.infer(EHR, [tensor], headers=headers)
        assert "200" not in str(caught.value.message())
    finally:
        client.close()
