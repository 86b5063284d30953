from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from app.errors import InvalidTensorError, ModelSpecError, PayloadTooLargeError
from app.inference.spec import ModelSpec, load_spec
from app.inference.tensors import check_declared_size, check_inputs, feature_contract, parse_feature_contract
from app.parsing.fhir import feature_map, from_features
from tests.conftest import REPO_ROOT
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


# The feature contract, on the real ehr-heart-disease declaration.

EHR = REPO_ROOT / "models" / "ehr-heart-disease"
#: age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak, slope, ca, thal
VALID_ROW = [63, 1, 1, 145, 233, 1, 2, 150, 0, 2.3, 3, 0, 6]


@pytest.fixture
def ehr() -> ModelSpec:
    return load_spec(EHR)


def _ehr_variant(tmp_path: Path, old: str, new: str) -> ModelSpec:
    text = (EHR / "model.toml").read_text(encoding="utf-8")
    assert old in text
    model_dir = tmp_path / "ehr-heart-disease"
    model_dir.mkdir()
    (model_dir / "model.toml").write_text(text.replace(old, new, 1), encoding="utf-8")
    return load_spec(model_dir)


def _rows(*rows: list[float]) -> dict[str, np.ndarray]:
    return {"features": np.array(rows, dtype=np.float32)}


def _with(column: int, value: float) -> list[float]:
    row = list(VALID_ROW)
    row[column] = value
    return row


def test_rows_inside_the_contract_pass(ehr: ModelSpec) -> None:
    inputs = _rows(VALID_ROW, _with(3, 260.0), _with(9, -3.0), _with(0, 18.0))
    assert check_inputs(ehr, inputs)["features"] is inputs["features"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (_with(0, 200.0), "row 0, column 0 (age): value outside the plausible range [18, 110]"),
        (_with(0, 17.0), "column 0 (age): value outside the plausible range [18, 110]"),
        (_with(2, 9.0), "column 2 (cp): value is not one of the declared codes [1, 2, 3, 4]"),
        (_with(12, 5.0), "column 12 (thal): value is not one of the declared codes [3, 6, 7]"),
        (_with(9, 7.5), "column 9 (oldpeak): value outside the plausible range [-3, 7]"),
        (_with(0, np.nan), "column 0 (age): NaN (missing) is not accepted: the feature is required"),
        (_with(2, np.nan), "column 2 (cp): NaN (missing) is not accepted: the feature is required"),
        (_with(4, np.inf), "column 4 (chol): Inf is never a valid feature value"),
        (_with(7, -np.inf), "column 7 (thalach): Inf is never a valid feature value"),
    ],
)
def test_a_value_outside_the_contract_is_refused_naming_the_column_not_the_value(
    ehr: ModelSpec, row: list[float], message: str
) -> None:
    with pytest.raises(InvalidTensorError, match=re.escape(message)) as caught:
        check_inputs(ehr, _rows(row))
    detail = str(caught.value)
    assert detail.startswith("input 'features', row 0, ")
    for echoed in ("200", "17", "9.0", "7.5", "inf"):
        assert echoed not in detail


def test_the_first_bad_row_is_named_in_a_batch(ehr: ModelSpec) -> None:
    with pytest.raises(InvalidTensorError, match=re.escape("row 2, column 2 (cp)")):
        check_inputs(ehr, _rows(VALID_ROW, VALID_ROW, _with(2, 0.0), _with(0, 500.0)))


def test_nan_passes_where_the_model_imputes_and_the_feature_is_optional(ehr: ModelSpec) -> None:
    optional = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    row = [np.nan if i in optional else v for i, v in enumerate(VALID_ROW)]
    check_inputs(ehr, _rows(row))


def test_nan_is_refused_where_the_model_does_not_impute(tmp_path: Path) -> None:
    spec = _ehr_variant(tmp_path, 'missing_policy = "impute"', 'missing_policy = "reject"')
    with pytest.raises(
        InvalidTensorError, match=re.escape("column 4 (chol): NaN (missing) is not accepted: the model")
    ):
        check_inputs(spec, _rows(_with(4, np.nan)))


def test_the_records_of_the_fhir_path_pass_the_same_contract(tmp_path: Path) -> None:
    """v1 records reach the model through the same check: what the FHIR path accepts (float64
    values at the bounds, NaN for imputed features) must still pass once cast to float32.
    float32(5.3) is 5.30000019, above a float64 bound of 5.3."""
    spec = _ehr_variant(tmp_path, "valid_range = [-3.0, 7.0]", "valid_range = [-3.0, 5.3]")
    fmap = feature_map(spec.preprocessing)
    edges = {"age": 110, "sex": "female", "cp": "asymptomatic", "oldpeak": 5.3, "ca": 3, "chol": 80}
    features = from_features({"features": edges}, fmap)
    assert features.imputed  # trestbps, thalach and the rest are NaN, imputed by the graph
    vector = np.asarray([features.values], dtype=np.float32)
    assert float(vector[0, 9]) > 5.3
    check_inputs(spec, {"features": vector})
    with pytest.raises(InvalidTensorError, match=re.escape("column 9 (oldpeak)")):
        check_inputs(spec, _rows(_with(9, 5.31)))


def test_the_contract_is_parsed_once_per_spec(ehr: ModelSpec, spec: ModelSpec) -> None:
    contract = feature_contract(ehr)
    assert contract is not None
    assert feature_contract(ehr) is contract
    assert [c.name for c in contract.columns][:3] == ["age", "sex", "cp"]
    assert feature_contract(spec) is None  # no [[preprocessing.features]]: shapes and dtypes only


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('feature_order = ["age", "sex"', 'feature_order = ["sex", "age"', "feature_order disagrees"),
        ("shape = [-1, 13]", "shape = [-1, 12]", "13 features for an input of width 12"),
        ('required = ["age", "sex", "cp"]', 'required = ["age", "weight"]', "undeclared features ['weight']"),
        ("valid_range = [18.0, 110.0]", "valid_range = [110.0, 18.0]", "age: valid_range low is above high"),
        ('datatype = "FP32"\nshape = [-1, 13]', 'datatype = "BYTES"\nshape = [-1, 13]', "must be numeric"),
    ],
)
def test_a_contract_that_cannot_apply_is_a_spec_error(tmp_path: Path, old: str, new: str, message: str) -> None:
    spec = _ehr_variant(tmp_path, old, new)
    with pytest.raises(ModelSpecError, match=re.escape(message)):
        parse_feature_contract(spec)


def test_integer_feature_tensors_are_checked_too(tmp_path: Path) -> None:
    spec = _ehr_variant(
        tmp_path, 'datatype = "FP32"\nshape = [-1, 13]\nallow_non_finite = true', 'datatype = "INT64"\nshape = [-1, 13]'
    )
    row = [63, 1, 1, 145, 233, 1, 2, 150, 0, 2, 3, 0, 6]
    check_inputs(spec, {"features": np.array([row], np.int64)})
    row[2] = 9
    with pytest.raises(InvalidTensorError, match=re.escape("column 2 (cp)")):
        check_inputs(spec, {"features": np.array([row], np.int64)})


def test_a_coded_column_is_judged_by_its_codes_not_by_a_range_of_its_source(ehr: ModelSpec) -> None:
    """fbs is derived from a glucose whose plausible range (mg/dL) says nothing about the 0/1 code."""
    raw = ehr.model_dump()
    (fbs,) = [f for f in raw["preprocessing"]["features"] if f["name"] == "fbs"]
    fbs["valid_range"] = [10.0, 2000.0]
    spec = ModelSpec.model_validate(raw)
    check_inputs(spec, _rows(_with(5, 0.0), _with(5, 1.0)))
    with pytest.raises(
        InvalidTensorError, match=re.escape("column 5 (fbs): value is not one of the declared codes [0, 1]")
    ):
        check_inputs(spec, _rows(_with(5, 120.0)))
