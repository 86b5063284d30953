"""FHIR semantics of the records path on the real ehr-heart-disease recipe (model.toml):
which reading is used, what counts as missing, which units are accepted, and what the answer
says was used. Bundles are shaped like US Core / Epic / Cerner exports (tests/support/fhir.py)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from app.errors import InvalidRequestError, MissingFeaturesError, ModelSpecError
from app.inference.spec import load_spec
from app.parsing.fhir import FeatureMap, FeatureUse, feature_map, from_bundle, from_features
from tests.conftest import REPO_ROOT
from tests.support.fhir import (
    WHEN,
    absent_obs,
    blood_pressure_panel,
    bundle,
    everything,
    exercise_max_heart_rate,
    full_observations,
    quantity_obs,
    site_quantity_obs,
    without,
)

PREPROCESSING = load_spec(REPO_ROOT / "models" / "ehr-heart-disease").preprocessing
FMAP = feature_map(PREPROCESSING)


def _recipe(**changes: Any) -> FeatureMap:
    return feature_map({**PREPROCESSING, **changes})


def _parse(document: dict[str, Any], fmap: FeatureMap = FMAP, now: datetime | None = None) -> Any:
    return from_bundle(json.dumps(document).encode(), fmap, now=now)


def _use(extracted: Any, name: str) -> FeatureUse:
    (use,) = [u for u in extracted.used if u.name == name]
    return use  # type: ignore[no-any-return]


def test_the_newest_reading_with_a_data_absent_reason_leaves_the_older_value_in_use() -> None:
    observations = [
        *without(full_observations(), "bp"),
        quantity_obs("bp-april", "8480-6", 138, "mm[Hg]", "2024-04-02T10:00:00Z"),
        absent_obs("bp-may", "8480-6", "not-performed", WHEN),
    ]
    extracted = _parse(bundle(*observations))
    assert _use(extracted, "trestbps") == FeatureUse("trestbps", 138.0, "mm[Hg]", "Observation/bp-april", False)


def test_a_feature_may_declare_a_shorter_look_back_than_the_model() -> None:
    features = [
        f | {"lookback_days": 30} if f["name"] == "chol" else f for f in PREPROCESSING["features"]
    ]  # a recipe where cholesterol must be from the last 30 days
    observations = [
        *without(full_observations(), "chol"),
        quantity_obs("chol-march", "2093-3", 233, "mg/dL", "2024-03-01T08:00:00Z"),
    ]
    assert _use(_parse(bundle(*observations)), "chol").source == "Observation/chol-march"
    extracted = _parse(bundle(*observations), _recipe(features=features))
    assert extracted.imputed == ["chol"]
    assert _use(extracted, "chol") == FeatureUse("chol", 240.0, "mg/dL", None, True)


def test_the_look_back_may_be_anchored_at_the_request_time() -> None:
    fmap = _recipe(lookback_anchor="now")
    with pytest.raises(MissingFeaturesError, match=r"chest-pain-type \(cp\)"):
        _parse(bundle(*full_observations()), fmap, now=datetime(2025, 6, 1, tzinfo=UTC))  # all a year too old
    assert _parse(bundle(*full_observations()), fmap, now=datetime(2024, 6, 1, tzinfo=UTC)).imputed == []


def test_the_most_recent_rule_without_a_window_takes_any_age() -> None:
    observations = [
        *without(full_observations(), "chol"),
        quantity_obs("chol-old", "2093-3", 233, "mg/dL", "2015-01-01"),
    ]
    assert _use(_parse(bundle(*observations)), "chol").imputed is True
    extracted = _parse(bundle(*observations), _recipe(selection="most_recent", lookback_days=None))
    assert _use(extracted, "chol").source == "Observation/chol-old"


def test_outcome_entries_of_a_searchset_are_not_the_record() -> None:
    document = everything(*full_observations())
    stranger = quantity_obs("bp-other", "8480-6", 120, "mm[Hg]", WHEN, patient="Patient/p2")
    document["entry"].append({"resource": stranger, "search": {"mode": "outcome"}})
    assert _parse(document).imputed == []
    document["entry"][-1]["search"]["mode"] = "include"
    with pytest.raises(InvalidRequestError, match="not the Bundle's Patient"):
        _parse(document)


def test_a_reading_without_an_id_is_named_by_its_full_url() -> None:
    document = everything(*full_observations())
    (entry,) = [e for e in document["entry"] if e["resource"].get("id") == "chol"]
    del entry["resource"]["id"]
    extracted = _parse(document)
    assert _use(extracted, "chol").source == "https://ehr.example.org/fhir/Observation/chol"
    assert "chol" not in extracted.observation_ids


def test_an_undated_reading_of_a_feature_is_refused_but_others_are_not_looked_at() -> None:
    undated = quantity_obs("bp-undated", "8480-6", 140, "mm[Hg]", WHEN)
    del undated["effectiveDateTime"]
    with pytest.raises(InvalidRequestError) as caught:
        _parse(bundle(*full_observations(), undated))
    assert (
        str(caught.value) == "Observation/bp-undated: no effective time or issued; the reading cannot be placed in time"
    )
    weight = quantity_obs("weight", "29463-7", 80, "kg", WHEN)
    del weight["effectiveDateTime"]
    assert _parse(bundle(*full_observations(), weight)).imputed == []


def test_a_value_beside_a_data_absent_reason_is_refused() -> None:
    both = quantity_obs("bp", "8480-6", 140, "mm[Hg]", WHEN)
    both["dataAbsentReason"] = {"coding": [{"code": "error"}]}
    with pytest.raises(InvalidRequestError, match=r"LOINC 8480-6 \(trestbps\): a reading has both"):
        _parse(bundle(*without(full_observations(), "bp"), both))


def test_a_limit_is_not_a_measurement() -> None:
    limit = quantity_obs("chol", "2093-3", 100, "mg/dL", WHEN)
    limit["valueQuantity"]["comparator"] = "<"
    with pytest.raises(InvalidRequestError, match=r"LOINC 2093-3 \(chol\): a value with a comparator"):
        _parse(bundle(*without(full_observations(), "chol"), limit))


def test_an_integer_heart_rate_has_no_unit_but_a_count_needs_none() -> None:
    integer = exercise_max_heart_rate("hr", 150, WHEN)
    del integer["valueQuantity"]
    integer["valueInteger"] = 150
    with pytest.raises(InvalidRequestError, match=r"LOINC 8867-4 \(thalach\): the quantity has no unit"):
        _parse(bundle(*without(full_observations(), "hr"), integer))
    vessels = site_quantity_obs("ca", "vessels-fluoroscopy", 2, "1", WHEN)
    del vessels["valueQuantity"]
    vessels["valueInteger"] = 2
    assert _use(_parse(bundle(*without(full_observations(), "ca"), vessels)), "ca").value == 2.0


@pytest.mark.parametrize(
    ("quantity", "accepted"),
    [
        ({"value": 233, "system": "urn:oid:1.2.840.114350.1.13.0", "code": "MGDL", "unit": "mg/dL"}, True),
        ({"value": 233, "system": "urn:oid:1.2.840.114350.1.13.0", "code": "mg/dL", "unit": "milligram/dl"}, False),
        ({"value": 233, "unit": "mg/dL"}, True),
        (
            {"value": 233, "system": "http://unitsofmeasure.org", "code": "mg/dL", "unit": "milligram per decilitre"},
            True,
        ),
        ({"value": 233, "system": "http://unitsofmeasure.org"}, False),
    ],
)
def test_a_unit_is_the_ucum_code_or_else_the_exact_unit_text(quantity: dict[str, Any], accepted: bool) -> None:
    observation = quantity_obs("chol", "2093-3", 233, "mg/dL", WHEN)
    observation["valueQuantity"] = quantity
    document = bundle(*without(full_observations(), "chol"), observation)
    if accepted:
        assert _use(_parse(document), "chol").value == 233.0
    else:
        with pytest.raises(InvalidRequestError, match=r"LOINC 2093-3 \(chol\): ") as caught:
            _parse(document)
        assert "milligram" not in str(caught.value)  # the record's free text is not echoed


def test_a_heart_rate_in_beats_per_minute_is_accepted() -> None:
    peak = exercise_max_heart_rate("hr", 150, WHEN)
    peak["valueQuantity"] |= {"code": "{beats}/min", "unit": "beats/min"}
    assert _use(_parse(bundle(*without(full_observations(), "hr"), peak)), "thalach").value == 150.0


def test_an_si_glucose_is_checked_for_plausibility_in_the_declared_unit() -> None:
    glucose = quantity_obs("glu", "14771-0", 200, "mmol/L", WHEN)  # 3603 mg/dL
    with pytest.raises(InvalidRequestError) as caught:
        _parse(bundle(*without(full_observations(), "glu"), glucose))
    assert str(caught.value) == "LOINC 1558-6 (fbs): value outside the plausible range [10, 2000]"


def test_a_panel_component_keeps_its_own_unit() -> None:
    panel = blood_pressure_panel("bp", 145, 90, WHEN)
    panel["component"][0]["valueQuantity"] = {
        "value": 19.33,
        "unit": "kPa",
        "system": "http://unitsofmeasure.org",
        "code": "kPa",
    }
    use = _use(_parse(bundle(*without(full_observations(), "bp"), panel)), "trestbps")
    assert use.value == pytest.approx(145.0, abs=0.05)
    assert use.source == "Observation/bp"


def test_used_lists_every_feature_in_order_with_its_source() -> None:
    extracted = _parse(bundle(*without(full_observations(), "thal")))
    assert [u.name for u in extracted.used] == list(FMAP.feature_order)
    assert _use(extracted, "age") == FeatureUse("age", 63.0, "a", "Patient/p1", False)
    assert _use(extracted, "sex") == FeatureUse("sex", 1.0, None, "Patient/p1", False)
    assert _use(extracted, "thal") == FeatureUse("thal", 3.0, None, None, True)
    assert math.isnan(extracted.values[FMAP.feature_order.index("thal")])


def test_plain_features_are_sourced_to_the_request() -> None:
    extracted = from_features({"features": {"age": 63, "sex": "male", "cp": 1, "fbs": 1}}, FMAP)
    assert _use(extracted, "age") == FeatureUse("age", 63.0, "a", "request", False)
    assert _use(extracted, "fbs") == FeatureUse("fbs", 1.0, None, "request", False)
    assert _use(extracted, "chol") == FeatureUse("chol", 240.0, "mg/dL", None, True)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"imputation": {"age": 53.0}}, "needs an imputation value"),
        ({"selection": "most_recent_within", "lookback_days": None}, "needs lookback_days"),
        ({"feature_order": ["age"]}, "feature_order must name every declared feature"),
    ],
)
def test_an_inconsistent_recipe_is_a_model_spec_error(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ModelSpecError, match=named):
        _recipe(**changes)


@pytest.mark.parametrize(
    ("feature", "change", "named"),
    [
        ("chol", {"alternative_loinc": {"14647-2": "g/L"}}, "neither unit nor one of alternative_units"),
        ("thalach", {"context": {"text": "exercise maximum"}}, "needs codes or methods"),
        ("trestbps", {"valid_range": [260.0, 60.0]}, "low is above high"),
    ],
)
def test_an_inconsistent_feature_is_a_model_spec_error(feature: str, change: dict[str, Any], named: str) -> None:
    features = [f | change if f["name"] == feature else f for f in PREPROCESSING["features"]]
    with pytest.raises(ModelSpecError, match=named):
        _recipe(features=features)
