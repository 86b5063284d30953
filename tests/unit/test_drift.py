"""The drift monitor: PSI against hand-computed values and the real UCI sites, the sliding window,
imputation counts, refresh by an injected clock, and no patient value in the exposition."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.errors import ModelSpecError
from app.observability.drift import (
    PSI_EPSILON,
    DriftMonitor,
    FeatureReference,
    population_stability_index,
    references_from_preprocessing,
)
from app.observability.metrics import Metrics
from training.ehr_heart_disease import EXTERNAL_SITE, FEATURES, load_dataset, make_splits

EHR_TOML = Path(__file__).resolve().parents[2] / "models" / "ehr-heart-disease" / "model.toml"
#: Two buckets split at 5: x <= 5 and x > 5, half of training in each.
HALVES = FeatureReference(proportions=(0.5, 0.5), edges=(5.0,))
SEX = FeatureReference(proportions=(0.3, 0.7), codes=(0.0, 1.0))
NAMES = ("x", "sex")
PROBABILITIES = {"no_cad": 0.25, "cad": 0.75}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def monitor(window: int = 4, min_samples: int = 4, refresh_s: float = 0.0) -> tuple[DriftMonitor, Metrics, Clock]:
    metrics, clock = Metrics(version="test"), Clock()
    drift = DriftMonitor(metrics, window=window, min_samples=min_samples, refresh_s=refresh_s, clock=clock)
    drift.register("ehr", "1", {"x": HALVES, "sex": SEX})
    return drift, metrics, clock


def feed(drift: DriftMonitor, xs: Sequence[float], sex: float = 1.0, imputed: Sequence[str] = ()) -> None:
    for x in xs:
        drift.observe_record("ehr", "1", names=NAMES, values=(x, sex), imputed=imputed, probabilities=PROBABILITIES)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "ehr", "version": "1", **labels})


def test_psi_of_a_known_shift_equals_the_hand_computed_value() -> None:
    drift, metrics, _ = monitor()
    feed(drift, [1.0, 2.0, 3.0, 9.0])  # window shares 0.75 / 0.25 against 0.5 / 0.5
    expected = 0.25 * math.log(0.75 / 0.5) + (-0.25) * math.log(0.25 / 0.5)
    assert expected == pytest.approx(0.2746530722)
    assert sample(metrics, "medinfer_feature_psi", feature="x") == pytest.approx(expected, rel=1e-12)


def test_an_empty_bucket_counts_as_epsilon_not_infinity() -> None:
    drift, metrics, _ = monitor()
    feed(drift, [1.0, 1.0, 1.0, 1.0])
    expected = (1 - 0.5) * math.log(1 / 0.5) + (PSI_EPSILON - 0.5) * math.log(PSI_EPSILON / 0.5)
    assert sample(metrics, "medinfer_feature_psi", feature="x") == pytest.approx(expected)


def test_a_window_like_training_gives_zero() -> None:
    deciles = FeatureReference(proportions=(0.1,) * 10, edges=tuple(float(e) for e in range(1, 10)))
    assert population_stability_index(deciles.expected, [50] * 10) == pytest.approx(0.0, abs=1e-15)
    metrics = Metrics(version="test")
    drift = DriftMonitor(metrics, window=500, min_samples=500, refresh_s=0.0)
    drift.register("m", "1", {"v": deciles})
    for value in np.tile(np.arange(10) + 0.5, 50):  # 50 in each decile bucket
        drift.observe_record("m", "1", names=("v",), values=(float(value),), imputed=(), probabilities={})
    assert drift.psi("m", "1") == {"v": pytest.approx(0.0, abs=1e-15)}


def test_the_window_slides() -> None:
    drift, metrics, _ = monitor()
    feed(drift, [1.0, 2.0, 3.0, 4.0])
    low = sample(metrics, "medinfer_feature_psi", feature="x")
    feed(drift, [9.0, 9.0])  # two low values leave, two high ones enter: 2 / 2
    assert sample(metrics, "medinfer_feature_psi", feature="x") == 0.0
    feed(drift, [8.0, 7.0])  # only high values left: the mirror image of the first window
    assert sample(metrics, "medinfer_feature_psi", feature="x") == pytest.approx(low)


def test_imputed_features_are_counted_and_left_out_of_the_window() -> None:
    drift, metrics, _ = monitor(min_samples=1)
    feed(drift, [5.0, 5.0, 5.0], imputed=["x"])
    assert sample(metrics, "medinfer_records_total") == 3
    assert sample(metrics, "medinfer_features_imputed_total", feature="x") == 3
    assert sample(metrics, "medinfer_features_imputed_total", feature="sex") is None
    assert set(drift.psi("ehr", "1")) == {"sex"}, "x held only imputed values: no index yet"
    feed(drift, [9.0, math.nan])  # a NaN that is not declared imputed stays out as well
    assert drift.psi("ehr", "1")["x"] == pytest.approx((1 - 0.5) * math.log(2) + (PSI_EPSILON - 0.5) * math.log(2e-4))


def test_no_index_is_published_before_the_window_holds_min_samples() -> None:
    drift, metrics, _ = monitor(window=10, min_samples=5)
    feed(drift, [1.0] * 4)
    assert sample(metrics, "medinfer_feature_psi", feature="x") is None
    feed(drift, [1.0])
    assert sample(metrics, "medinfer_feature_psi", feature="x") is not None


def test_gauges_refresh_when_the_clock_says_so_or_on_publish() -> None:
    drift, metrics, clock = monitor(refresh_s=5.0)
    feed(drift, [1.0, 2.0, 3.0, 9.0])
    assert sample(metrics, "medinfer_feature_psi", feature="x") is None, "not due: registered at t=0"
    clock.now = 5.0
    feed(drift, [9.0])
    assert sample(metrics, "medinfer_feature_psi", feature="x") == 0.0  # window 2, 3, 9, 9: two and two
    feed(drift, [9.0, 9.0])  # window 9, 9, 9, 9: due again only at t=10
    assert sample(metrics, "medinfer_feature_psi", feature="x") == 0.0
    drift.publish()
    assert sample(metrics, "medinfer_feature_psi", feature="x") == drift.psi("ehr", "1")["x"] > 3


def test_an_undeclared_code_falls_into_the_other_bucket() -> None:
    assert SEX.bucket(1.0) == 1
    assert SEX.bucket(2.0) == 2
    assert SEX.expected == (0.3, 0.7, 0.0)
    drift, metrics, _ = monitor()
    feed(drift, [1.0] * 4, sex=2.0)
    assert (sample(metrics, "medinfer_feature_psi", feature="sex") or 0) > 1


def test_numeric_buckets_are_closed_on_the_right() -> None:
    reference = FeatureReference(proportions=(0.25, 0.25, 0.25, 0.25), edges=(0.0, 1.0, 2.0))
    assert [reference.bucket(v) for v in (-1.0, 0.0, 0.5, 1.0, 2.0, 2.5)] == [0, 0, 1, 1, 2, 3]
    # the training script counts with numpy's searchsorted, side="left": the same buckets
    assert np.searchsorted([0.0, 1.0, 2.0], [-1.0, 0.0, 0.5, 1.0, 2.0, 2.5], side="left").tolist() == [
        0,
        0,
        1,
        1,
        2,
        3,
    ]


def test_outputs_fill_the_probability_histogram_for_records_and_images() -> None:
    drift, metrics, _ = monitor()
    feed(drift, [1.0])
    drift.observe_image("cxr", "2", {"pneumonia": 0.95, "normal": 0.05})
    assert sample(metrics, "medinfer_output_probability_count", label="cad") == 1
    assert sample(metrics, "medinfer_output_probability_bucket", label="cad", le="0.7") == 0
    assert sample(metrics, "medinfer_output_probability_bucket", label="cad", le="0.8") == 1
    image = {"model": "cxr", "version": "2", "label": "pneumonia"}
    assert metrics.registry.get_sample_value("medinfer_output_probability_sum", image) == pytest.approx(0.95)


def test_an_unregistered_version_still_counts_outputs_and_imputations() -> None:
    drift, metrics, _ = monitor()
    drift.observe_record("other", "3", names=("x",), values=(1.0,), imputed=("x",), probabilities={"a": 0.5})
    labels = {"model": "other", "version": "3"}
    assert metrics.registry.get_sample_value("medinfer_records_total", labels) == 1
    assert metrics.registry.get_sample_value("medinfer_features_imputed_total", {**labels, "feature": "x"}) == 1
    assert drift.psi("other", "3") == {}


def test_a_retired_version_loses_its_index_series() -> None:
    drift, metrics, _ = monitor()
    feed(drift, [1.0] * 4)
    assert sample(metrics, "medinfer_feature_psi", feature="x") is not None
    drift.forget("ehr", "1")
    assert sample(metrics, "medinfer_feature_psi", feature="x") is None
    drift.forget("ehr", "1")  # twice is harmless


def test_sync_follows_the_registry_and_keeps_the_windows_of_unchanged_versions() -> None:
    drift, metrics, _ = monitor()
    feed(drift, [1.0] * 4)
    before = drift.psi("ehr", "1")
    drift.sync([("ehr", "1", {"x": HALVES, "sex": SEX}), ("ehr", "2", {"x": HALVES})])
    assert drift.psi("ehr", "1") == before, "same reference: the window is kept"
    for _ in range(4):
        drift.observe_record("ehr", "2", names=("x",), values=(9.0,), imputed=(), probabilities={})
    assert set(drift.psi("ehr", "2")) == {"x"}
    drift.sync([("ehr", "2", {"x": FeatureReference(proportions=(0.2, 0.8), edges=(5.0,))})])
    assert drift.psi("ehr", "1") == {}
    assert sample(metrics, "medinfer_feature_psi", feature="x") is None, "version 1 retired: its series went"
    assert drift.psi("ehr", "2") == {}, "a changed reference starts an empty window"


def test_the_exposition_carries_no_patient_value() -> None:
    drift, metrics, _ = monitor(min_samples=1)
    marker = 4.73921
    feed(drift, [marker, marker + 0.00001], sex=1.0)
    feed(drift, [marker], imputed=["sex"])
    text = metrics.registry_text()
    assert "medinfer_feature_psi{" in text
    assert "medinfer_features_imputed_total{" in text
    assert "4.739" not in text
    psi_lines = [line for line in text.splitlines() if line.startswith("medinfer_feature_psi{")]
    for line in psi_lines:
        labels = line[line.index("{") + 1 : line.index("}")]
        assert {part.split("=")[0] for part in labels.split(",")} == {"model", "version", "feature"}


# ---------------------------------------------------------------------------------------------
# The EHR model's training reference, and real populations against it


def ehr_preprocessing() -> dict[str, Any]:
    with EHR_TOML.open("rb") as file:
        preprocessing: dict[str, Any] = tomllib.load(file)["preprocessing"]
    return preprocessing


def psi_of(rows: np.ndarray) -> dict[str, float]:
    """What the service would publish after seeing these UCI rows (missing values imputed)."""
    drift = DriftMonitor(Metrics(version="test"), window=len(rows), min_samples=100, refresh_s=0.0)
    drift.register("ehr-heart-disease", "1", references_from_preprocessing(ehr_preprocessing()))
    for row in rows:
        imputed = [name for name, value in zip(FEATURES, row, strict=True) if math.isnan(value)]
        drift.observe_record(
            "ehr-heart-disease", "1", names=FEATURES, values=row.tolist(), imputed=imputed, probabilities={}
        )
    return drift.psi("ehr-heart-disease", "1")


def test_the_ehr_model_declares_a_reference_for_every_feature() -> None:
    references = references_from_preprocessing(ehr_preprocessing())
    assert list(references) == FEATURES
    assert references["age"].edges == (39.0, 43.0, 47.0, 50.0, 53.0, 55.0, 57.0, 59.0, 63.0)
    assert references["cp"].codes == (1.0, 2.0, 3.0, 4.0)
    assert references["ca"].edges == (0.0, 1.0, 2.0), "deciles piled on 0, 1, 2 are deduplicated"


def test_the_training_split_reproduces_its_reference_exactly() -> None:
    """The proportions in model.toml were counted with the bucket rule the service applies."""
    rows, labels, site = load_dataset()
    psi = psi_of(make_splits(rows, labels, site).X_train)
    assert set(psi) == set(FEATURES)
    assert max(psi.values()) < 1e-6


def test_the_external_site_shows_as_a_major_shift() -> None:
    """VA Long Beach, held out of training, is an older, almost all-male population with other
    ECG findings: the index calls it a major shift on the features that differ."""
    rows, _, site = load_dataset()
    psi = psi_of(rows[site == EXTERNAL_SITE])
    assert psi["age"] > 0.25
    assert psi["sex"] > 0.25
    assert psi["restecg"] > 0.25
    assert "ca" not in psi, "ca is missing for most VA patients: fewer than min_samples values"


def test_internal_test_patients_show_no_major_shift() -> None:
    rows, labels, site = load_dataset()
    psi = psi_of(make_splits(rows, labels, site).X_test)
    assert max(psi.values()) < 0.25


def test_a_model_without_a_drift_table_has_no_reference() -> None:
    assert references_from_preprocessing({"kind": "dicom"}) == {}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"edges": [1.0], "proportions": [0.5, 0.5], "codes": [1.0]}, "either bucket edges or codes"),
        ({"edges": [1.0, 2.0], "proportions": [0.5, 0.5]}, "needs 3 proportions"),
        ({"edges": [2.0, 1.0], "proportions": [0.3, 0.3, 0.4]}, "increase strictly"),
        ({"codes": [1.0, 2.0], "proportions": [0.9, 0.9]}, "sum to 1"),
        ({"codes": [1.0, 1.0], "proportions": [0.5, 0.5]}, "unique"),
        ({"codes": ["a"], "proportions": [1.0]}, "lists of numbers"),
        ({"codes": [1.0], "proportions": [1.0], "mean": 3.0}, "a table of"),
        ({"edges": [1.0]}, "lists of numbers"),
    ],
)
def test_a_malformed_reference_refuses_the_model_naming_the_feature(table: dict[str, Any], message: str) -> None:
    preprocessing = {"feature_order": ["age"], "drift": {"features": {"age": table}}}
    with pytest.raises(ModelSpecError, match=message) as caught:
        references_from_preprocessing(preprocessing)
    assert "[preprocessing.drift.features.age]" in caught.value.detail


def test_a_reference_for_a_feature_the_model_lacks_is_refused() -> None:
    preprocessing = {"feature_order": ["age"], "drift": {"features": {"bmi": {"codes": [1.0], "proportions": [1.0]}}}}
    with pytest.raises(ModelSpecError, match="not a feature of the model"):
        references_from_preprocessing(preprocessing)
