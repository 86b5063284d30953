"""Existing Triton/KServe clients work unchanged: the real `tritonclient[http]` against a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import Served, base_env, medinfer, serve

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path, model_repo: Path) -> Iterator[tuple[Served, dict[str, str]]]:
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
