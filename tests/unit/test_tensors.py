from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.errors import InvalidTensorError, PayloadTooLargeError
from app.inference.spec import ModelSpec, load_spec
from app.inference.tensors import check_declared_size, check_inputs
from tests.support.models import write_model


@pytest.fixture
def spec(tmp_path: Path) -> ModelSpec:
    return load_spec(write_model(tmp_path, "alpha", {"1": 1}))


def test_a_fitting_tensor_passes(spec: ModelSpec) -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    assert check_inputs(spec, {"features": x})["features"] is x


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"pixels": np.zeros((1, 3), np.float32)}, r"unknown input\(s\) \['pixels'\]"),
        ({}, r"missing input\(s\) \['features'\]"),
        ({"features": np.zeros((1, 3), np.float64)}, "datatype FP64, model expects FP32"),
        ({"features": np.zeros((1, 3, 1), np.float32)}, "has rank 3"),
        ({"features": np.zeros((1, 4), np.float32)}, "dimension 1 is 4, model expects 3"),
        ({"features": np.zeros((0, 3), np.float32)}, "empty batch"),
        ({"features": np.zeros((9, 3), np.float32)}, "exceeds the model's max_batch_size 8"),
        ({"features": np.array([[1.0, np.nan, 0.0]], np.float32)}, "NaN or Inf"),
        ({"features": np.array([[1.0, np.inf, 0.0]], np.float32)}, "NaN or Inf"),
    ],
)
def test_misfits_are_refused_naming_the_input(spec: ModelSpec, inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidTensorError, match=message):
        check_inputs(spec, inputs)


def test_declared_size_is_capped_before_decoding() -> None:
    assert check_declared_size("image", "FP32", [2, 1, 224, 224], 1 << 20) == 2 * 224 * 224
    with pytest.raises(PayloadTooLargeError, match="'image'"):
        check_declared_size("image", "FP32", [64, 1, 224, 224], 1 << 20)
    with pytest.raises(InvalidTensorError, match="negative"):
        check_declared_size("image", "FP32", [-1, 3], 1 << 20)
