"""The safety gate's verdicts and how each encoder says "indeterminate" (no label, no Present)."""

from __future__ import annotations

import io
import math
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment
from pydicom import Dataset
from pydicom.data import get_testdata_file

from app.domain import FeatureUse
from app.encoders.dicom_sr import INDETERMINATE_FINDING, OOD_SCORE, build_sr, sr_bytes
from app.encoders.fhir import FEATURE_USED_EXTENSION, risk_assessment
from app.encoders.json import prediction
from app.inference.registry import ServedVersion, load_version
from app.inference.spec import ContentChecks, OodSpec, load_spec
from app.postprocess.classification import classify
from app.postprocess.ood import INDETERMINATE, OUTSIDE, OodReason, assess_image, assess_record, content_findings

REPO = Path(__file__).resolve().parents[2] / "models"
CHECKS = ContentChecks(min_std=0.02, saturation_fraction=0.5)
IMAGE_OOD = OodSpec(method="mahalanobis-penultimate", output="ood_score", threshold=30.0, content_checks=CHECKS)
RECORD_OOD = OodSpec(
    method="training-range", training_ranges={"age": (29.0, 77.0), "chol": (100.0, 400.0)}, max_imputed=1
)


@pytest.fixture(scope="module")
def cxr() -> ServedVersion:
    spec = load_spec(REPO / "cxr-pneumonia")
    return load_version(spec, REPO / "cxr-pneumonia", spec.served_versions()[-1])


@pytest.fixture(scope="module")
def ehr() -> ServedVersion:
    spec = load_spec(REPO / "ehr-heart-disease")
    return load_version(spec, REPO / "ehr-heart-disease", spec.served_versions()[-1])


def _textured(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 0.9, size=(1, 32, 32)).astype(np.float32)


def test_a_blank_image_is_caught_by_the_content_checks() -> None:
    findings = content_findings(np.full((1, 32, 32), 0.4, dtype=np.float32), CHECKS)
    assert [f.reason for f in findings] == [OodReason.CONTENT]
    assert "blank or constant" in findings[0].text


def test_a_saturated_image_is_caught_by_the_content_checks() -> None:
    image = np.zeros((1, 32, 32), dtype=np.float32)
    image[:, :, :8] = 1.0  # a quarter white, the rest black: contrast, but nothing in between
    findings = content_findings(image, CHECKS)
    assert [f.text.split(" (")[0] for f in findings] == ["image is saturated"]


def test_a_textured_image_under_the_threshold_is_inside() -> None:
    verdict = assess_image(IMAGE_OOD, 12.0, _textured())
    assert verdict is not None
    assert not verdict.outside
    assert verdict.score == 12.0


@pytest.mark.parametrize("score", [30.5, math.nan, math.inf])
def test_a_score_above_the_threshold_or_not_a_number_is_outside(score: float) -> None:
    verdict = assess_image(IMAGE_OOD, score, _textured())
    assert verdict is not None
    assert verdict.outside
    assert verdict.reasons == (OodReason.OOD_SCORE,)
    assert verdict.summary().startswith(OUTSIDE)


def test_a_model_without_a_detector_gives_no_verdict() -> None:
    assert assess_image(None, 1e9, _textured()) is None
    assert assess_record(None, ["age"], [300.0], []) is None


def test_a_record_outside_its_training_range_names_the_feature_not_the_value() -> None:
    verdict = assess_record(RECORD_OOD, ["age", "chol"], [91.0, math.nan], ["chol"])
    assert verdict is not None
    assert verdict.outside
    assert verdict.reasons == (OodReason.FEATURE_RANGE,)
    assert verdict.findings[0].text == "age outside the range seen in training [29, 77]"
    assert "91" not in verdict.summary()
    assert verdict.score == 1.0  # departures: a count, from which no value can be worked back


def test_too_many_imputed_features_is_outside() -> None:
    verdict = assess_record(RECORD_OOD, ["age", "chol"], [50.0, math.nan], ["chol", "thal"])
    assert verdict is not None
    assert verdict.reasons == (OodReason.IMPUTED,)
    assert verdict.score == 1.0  # one imputed feature beyond the cap of 1
    inside = assess_record(RECORD_OOD, ["age", "chol"], [50.0, math.nan], ["chol"])
    assert inside is not None
    assert not inside.outside


def test_an_outside_verdict_replaces_the_label_and_keeps_the_probabilities(cxr: ServedVersion) -> None:
    verdict = assess_image(IMAGE_OOD, 500.0, _textured())
    decision = classify(cxr.spec, [0.0, 1.0], None, verdict)
    assert decision.label == INDETERMINATE
    assert decision.positive is None
    assert decision.indeterminate
    assert decision.probabilities == {"normal": 0.0, "pneumonia": 1.0}
    inside = classify(cxr.spec, [0.0, 1.0], None, assess_image(IMAGE_OOD, 1.0, _textured()))
    assert inside.label == "pneumonia"
    assert inside.positive is True
    assert not inside.indeterminate


def test_the_json_answer_says_indeterminate_with_the_score(cxr: ServedVersion) -> None:
    decision = classify(cxr.spec, [0.0, 1.0], None, assess_image(IMAGE_OOD, 500.0, _textured()))
    answer = prediction(cxr, decision, request_id="r1", input_summary={"kind": "dicom"})
    assert answer["decision"]["label"] == "indeterminate"
    assert answer["decision"]["indeterminate"] is True
    assert answer["decision"]["positive"] is None
    assert answer["validated_input"]["inside"] is False
    assert answer["probabilities"] is None  # not shown: the model cannot stand behind them
    assert answer["validated_input"]["score"] == 500.0
    assert answer["validated_input"]["threshold"] == 30.0
    assert answer["validated_input"]["reasons"][0]["code"] == "ood_score"
    assert any(w.startswith(OUTSIDE) for w in answer["warnings"])


def _rg1() -> Dataset:
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert path is not None, "pydicom-data is not installed"
    return pydicom.dcmread(path)


def test_the_sr_of_an_indeterminate_image_has_no_present_finding_and_reports_the_score(
    cxr: ServedVersion, tmp_path: Path
) -> None:
    decision = classify(cxr.spec, [0.0, 1.0], None, assess_image(IMAGE_OOD, 500.0, _textured()))
    sr = build_sr([_rg1()], cxr, decision, request_id="req-ood", software_version="0.1.0")
    ds = pydicom.dcmread(io.BytesIO(sr_bytes(sr)))
    assert ds.VerificationFlag == "UNVERIFIED"
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type is not None
    assert (group.finding_type.value, group.finding_type.scheme_designator) == (
        INDETERMINATE_FINDING.value,
        INDETERMINATE_FINDING.scheme_designator,
    )
    assert group.get_qualitative_evaluations() == []
    (measurement,) = group.get_measurements()
    assert measurement.name.value == OOD_SCORE.value
    assert measurement.value == pytest.approx(500.0)
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_bytes(sr))
    dump = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, check=True).stdout
    assert "Indeterminate" in dump
    assert "outside the model's validated input" in dump
    assert "Present" not in dump
    assert "Probability" not in dump


def test_the_fhir_answer_of_an_indeterminate_record_has_no_probability(ehr: ServedVersion) -> None:
    verdict = assess_record(RECORD_OOD, ["age", "chol"], [91.0, 200.0], [])
    decision = classify(ehr.spec, [0.2, 0.8], None, verdict)
    resource = risk_assessment(
        ehr, decision, patient_reference="Patient/p1", observation_ids=[], request_id="r1", used=()
    )
    (only,) = resource["prediction"]
    assert only["outcome"] == {"text": "indeterminate"}
    assert "probabilityDecimal" not in only
    assert only["rationale"].startswith(OUTSIDE)


def test_the_fhir_answer_lists_each_input_and_codes_no_outcome_of_a_demonstration_model(ehr: ServedVersion) -> None:
    assert ehr.spec.not_for_clinical_use
    used = (
        FeatureUse("age", 61.0, "a", "Patient/p1", imputed=False),
        FeatureUse("trestbps", 148.0, "mm[Hg]", "Observation/bp1", imputed=False),
        FeatureUse("chol", 240.0, "mg/dL", None, imputed=True),
    )
    decision = classify(ehr.spec, [0.3, 0.7])
    resource = risk_assessment(
        ehr, decision, patient_reference="Patient/p1", observation_ids=["bp1"], request_id="r1", used=used
    )
    RiskAssessment.model_validate(resource)
    assert all("coding" not in p["outcome"] for p in resource["prediction"])
    extensions = [e for e in resource["extension"] if e["url"] == FEATURE_USED_EXTENSION]
    assert len(extensions) == 3
    trestbps = {part["url"]: part for part in extensions[1]["extension"]}
    assert trestbps["value"]["valueQuantity"]["value"] == 148.0
    assert trestbps["source"]["valueReference"]["reference"] == "Observation/bp1"
    chol = {part["url"]: part for part in extensions[2]["extension"]}
    assert chol["imputed"]["valueBoolean"] is True
    assert "source" not in chol
    assert any("chol = 240 mg/dL (imputed)" in note["text"] for note in resource["note"])
