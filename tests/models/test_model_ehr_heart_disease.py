"""ehr-heart-disease: committed artefacts are consistent, and ONNX equals scikit-learn."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tests.models.helpers import MODELS_DIR, load_model_toml, ort_session

NAME = "ehr-heart-disease"
MODEL_DIR = MODELS_DIR / NAME


@pytest.fixture(scope="module")
def spec() -> dict:
    return load_model_toml(NAME)


@pytest.fixture(scope="module")
def onnx_path(spec: dict):
    versions = sorted(int(v) for v in spec["versions"])
    return MODEL_DIR / str(versions[-1]) / "model.onnx"


@pytest.fixture(scope="module")
def reference():
    """Retrain exactly as `python -m training.ehr_heart_disease` does (a few seconds)."""
    from training.ehr_heart_disease import load_dataset, train_reference_model

    model, splits = train_reference_model()
    x_all, y, site = load_dataset()
    return model, splits, x_all, y, site


def test_sha256_in_model_toml_matches_file(spec: dict) -> None:
    for version, entry in spec["versions"].items():
        path = MODEL_DIR / version / "model.onnx"
        assert path.is_file(), path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]


def test_model_toml_matches_onnx_signature(spec: dict, onnx_path) -> None:
    assert spec["name"] == NAME == MODEL_DIR.name
    assert spec["labels"] == ["no_cad", "cad"]
    assert spec["positive_label"] == "cad"
    assert spec["not_for_clinical_use"] is True
    assert (MODEL_DIR / spec["card"]).is_file()
    sess = ort_session(onnx_path)
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert [i["name"] for i in spec["inputs"]] == [inp.name] == ["features"]
    assert [o["name"] for o in spec["outputs"]] == [out.name] == ["probabilities"]
    assert inp.type == "tensor(float)"
    assert out.type == "tensor(float)"
    assert spec["inputs"][0]["shape"] == [-1, 13]
    assert inp.shape[1] == 13
    assert not isinstance(inp.shape[0], int)
    assert spec["outputs"][0]["shape"] == [-1, 2]
    pre = spec["preprocessing"]
    assert pre["kind"] == "fhir"
    assert [f["name"] for f in pre["features"]] == pre["feature_order"]
    assert [f["index"] for f in pre["features"]] == list(range(13))
    by_name = {f["name"]: f for f in pre["features"]}
    assert by_name["trestbps"]["loinc"] == "8480-6"
    assert by_name["trestbps"]["unit"] == "mm[Hg]"
    assert by_name["chol"]["loinc"] == "2093-3"
    assert by_name["chol"]["unit"] == "mg/dL"
    assert by_name["thalach"]["loinc"] == "8867-4"
    assert by_name["thalach"]["unit"] == "/min"
    assert by_name["age"]["source"] == "Patient.birthDate"
    assert by_name["sex"]["source"] == "Patient.gender"
    assert set(pre["imputation"]) == set(pre["feature_order"])


def test_thresholds_and_metrics_agree(spec: dict) -> None:
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    th = spec["thresholds"]
    assert th["default"] == metrics["threshold"] == th["operating_points"]["high_sensitivity"]["threshold"]
    assert th["operating_points"]["high_sensitivity"]["sensitivity"] >= 0.85
    assert metrics["validation"]["sensitivity"] >= 0.85
    for split in ("internal_test", "external_test"):
        m = metrics[split]
        for key in ("accuracy", "sensitivity", "specificity", "f1", "auroc", "brier"):
            lo, hi = m["ci95"][key]
            assert lo <= m[key] <= hi, (split, key)
    assert metrics["external_test"]["n"] == 200  # all of VA Long Beach
    assert metrics["sha256"] == spec["versions"]["1"]["sha256"]


def test_onnx_equals_sklearn_on_all_patients(reference, onnx_path) -> None:
    model, _, x_all, _, _ = reference
    x32 = x_all.astype(np.float32)
    (p_onnx,) = ort_session(onnx_path).run(None, {"features": x32})
    p_skl = model.predict_proba(x32.astype(np.float64))
    assert p_onnx.shape == (920, 2)
    assert p_onnx.dtype == np.float32
    np.testing.assert_allclose(p_onnx, p_skl, rtol=0, atol=1e-5)
    np.testing.assert_allclose(p_onnx.sum(axis=1), 1.0, atol=1e-6)
    assert np.isnan(x_all).any()  # the comparison covered rows with missing values


def test_onnx_equals_sklearn_on_edge_cases(reference, onnx_path) -> None:
    """Only the required features present, extreme values, and the imputation values themselves."""
    model, _, _, _, _ = reference
    nan = np.nan
    rows = np.array(
        [
            [63, 1, 1, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan],
            [40, 0, 3, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan],
            [77, 1, 4, 200, 600, 1, 2, 70, 1, 6.2, 3, 3, 7],
            [29, 0, 2, 94, 85, 0, 0, 202, 0, -2.6, 1, 0, 3],
            [53, 1, 4, 130, 240, 0, 0, 143, 0, 0.2, 2, 0, 3],
        ],
        dtype=np.float32,
    )
    (p_onnx,) = ort_session(onnx_path).run(None, {"features": rows})
    np.testing.assert_allclose(p_onnx, model.predict_proba(rows.astype(np.float64)), rtol=0, atol=1e-5)
    # Missing values are imputed in-graph: NaN gives the same answer as the imputation value.
    pre = load_model_toml(NAME)["preprocessing"]
    filled = rows.copy()
    for j, name in enumerate(pre["feature_order"]):
        filled[np.isnan(filled[:, j]), j] = pre["imputation"][name]
    (p_filled,) = ort_session(onnx_path).run(None, {"features": filled})
    np.testing.assert_allclose(p_filled, p_onnx, rtol=0, atol=1e-6)
    # Risk rises with the classic high-risk profile.
    assert p_onnx[2, 1] > 0.9
    assert p_onnx[3, 1] < 0.1


def test_retrained_split_and_threshold_match_committed(reference) -> None:
    from training.common import threshold_for_sensitivity
    from training.ehr_heart_disease import TARGET_SENSITIVITY

    model, splits, _, _, _ = reference
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    assert len(splits.y_train) == metrics["dataset"]["train"]["n"]
    assert len(splits.y_val) == metrics["validation"]["n"]
    assert len(splits.y_test) == metrics["internal_test"]["n"]
    p_val = model.predict_proba(splits.X_val)[:, 1]
    assert threshold_for_sensitivity(splits.y_val, p_val, TARGET_SENSITIVITY) == metrics["threshold"]


def test_every_feature_has_a_plausibility_range_and_the_recipe_loads(spec: dict) -> None:
    from app.parsing.fhir import feature_map

    pre = spec["preprocessing"]
    fmap = feature_map(pre)
    for feature in fmap.features:
        assert feature.valid_range is not None, feature.name
        if feature.codes and not feature.derived:  # a coded feature's range is its code table's
            assert feature.valid_range == (min(feature.codes.values()), max(feature.codes.values()))
    assert fmap.selection == "most_recent_within"
    assert fmap.lookback_days == 365
    by_name = {f.name: f for f in fmap.features}
    thalach = by_name["thalach"].context
    assert thalach is not None
    assert ("http://snomed.info/sct", "76746007") in {(c.system, c.code) for c in thalach.methods}
    assert by_name["chol"].alternative_loinc == {"14647-2": "mmol/L"}
    assert by_name["fbs"].alternative_loinc == {"14771-0": "mmol/L"}


def test_operating_points_name_the_split_they_were_measured_on(spec: dict) -> None:
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    points = spec["thresholds"]["operating_points"]
    assert {p["split"] for p in points.values()} == {"validation"}
    high = points["high_sensitivity"]
    assert high["sensitivity"] == round(metrics["validation"]["sensitivity"], 4)
    assert high["specificity"] == round(metrics["validation"]["specificity"], 4)


def test_record_ood_statistics_are_the_training_split_and_flag_at_most_5_percent(spec: dict, reference) -> None:
    from app.inference.spec import OodSpec
    from training.ehr_heart_disease import FEATURES, NUMERIC

    _, splits, _, _, _ = reference
    ood = OodSpec.model_validate(spec["versions"]["1"]["ood"])
    assert ood.method == "training-range"
    assert set(ood.training_ranges) == set(NUMERIC)
    for name, (low, high) in ood.training_ranges.items():
        column = splits.X_train[:, FEATURES.index(name)]
        assert (low, high) == (np.nanmin(column), np.nanmax(column)), name
    # The share of the internal test set flagged, recomputed the way the service checks a record.
    x = splits.X_test
    flagged = np.isnan(x).sum(axis=1) > ood.max_imputed
    for name, (low, high) in ood.training_ranges.items():
        value = x[:, FEATURES.index(name)]
        flagged |= ~np.isnan(value) & ((value < low) | (value > high))
    assert ood.in_distribution_flagged == round(float(flagged.mean()), 4)
    assert ood.in_distribution_flagged is not None
    assert ood.in_distribution_flagged <= 0.05


def test_the_card_reports_each_site_and_each_sex_with_its_split() -> None:
    card = (MODEL_DIR / "card.md").read_text()
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    for site, split in (
        ("Cleveland", "internal test"),
        ("Hungary", "internal test"),
        ("Switzerland", "internal test"),
        ("VA Long Beach", "external test"),
    ):
        assert f"| {site} | {split} | {metrics['subgroups'][f'site:{site}']['n']} |" in card
    for sex in ("male", "female"):
        for split in ("internal_test", "external_test"):
            n = metrics["subgroups"][f"sex:{sex}:{split}"]["n"]
            assert f"| {sex} | {split.replace('_', ' ')} | {n} |" in card
    assert "internal test 4.2 %" in card
