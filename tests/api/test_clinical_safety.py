"""Never a finding the model cannot stand behind: real radiographs, other anatomy, blank and noise
images sent to the phantom-trained CXR model answer "indeterminate" with the OOD score, in JSON
and in the SR; in-distribution phantoms still get decisions. Each answer is audited and counted."""

from __future__ import annotations

import io
import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.riskassessment import RiskAssessment
from pydicom.data import get_testdata_file

from app.config import Settings
from app.domain import Scope
from app.main import create_app
from app.postprocess.ood import OUTSIDE
from tests.conftest import REPO_ROOT, register, wait_ready
from training.dicom_studies import study_bytes

MODEL = "cxr-pneumonia"
DICOM = "application/dicom"
RG1 = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


@pytest.fixture(scope="module")
def imaging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, Settings]]:
    tmp = tmp_path_factory.mktemp("safety")
    repo = tmp / "models"
    shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)
    settings = Settings(env="test", data_dir=tmp / "var", model_repository=repo)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDINFER_DATA_DIR", str(settings.data_dir))
        from app.__main__ import main as cli

        assert cli(["migrate"]) == 0
        key = register(settings, Scope.INFER, Scope.MODELS_READ, client_id="safety")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client, key, settings


def _file(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, "pydicom-data is not installed"
    return Path(path).read_bytes()


def _as_chest_cr(name: str) -> bytes:
    """Another file's real pixels under a chest CR header: what a mislabelled study looks like."""
    ds = pydicom.dcmread(io.BytesIO(_file(name)))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    for keyword in ("NumberOfFrames", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        if keyword in ds:
            delattr(ds, keyword)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_pixels(pixels: np.ndarray) -> bytes:
    """An in-distribution phantom's header around other pixels (blank, noise)."""
    ds = pydicom.dcmread(io.BytesIO(study_bytes(seed=11, positive=False, rows=256)))
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.Rows, ds.Columns = pixels.shape
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _predict(client: TestClient, key: str, body: bytes, accept: str = "application/json") -> Any:
    response = client.post(
        f"/v1/models/{MODEL}/predict",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": DICOM, "Accept": accept},
    )
    assert response.status_code == 200, response.text
    return response.json() if accept == "application/json" else response.content


def _threshold(client: TestClient, key: str) -> float:
    model = client.get(f"/v1/models/{MODEL}", headers={"Authorization": f"Bearer {key}"}).json()
    (version,) = model["versions"]
    assert version["ood"]["output"] == "ood_score"
    return float(version["ood"]["threshold"])


def _indeterminate(answer: dict[str, Any], threshold: float) -> None:
    assert answer["decision"]["label"] == "indeterminate"
    assert answer["decision"]["indeterminate"] is True
    assert answer["decision"]["positive"] is None
    verdict = answer["validated_input"]
    assert verdict["inside"] is False
    assert verdict["verdict"] == OUTSIDE
    assert verdict["threshold"] == threshold
    assert answer["probabilities"] is None
    assert any(w.startswith(OUTSIDE) for w in answer["warnings"])


@pytest.mark.parametrize("name", RG1)
def test_a_real_chest_radiograph_is_indeterminate_with_its_ood_score(
    imaging: tuple[TestClient, str, Settings], name: str
) -> None:
    client, key, _ = imaging
    threshold = _threshold(client, key)
    answer = _predict(client, key, _file(name))
    _indeterminate(answer, threshold)
    assert answer["validated_input"]["score"] > threshold
    assert [r["code"] for r in answer["validated_input"]["reasons"]] == ["ood_score"]
    assert answer["model"]["not_for_clinical_use"] is True
    assert answer["input"]["instances"][0]["label"] == "indeterminate"


@pytest.mark.parametrize("name", RG1)
def test_the_sr_of_a_real_chest_radiograph_has_no_pneumonia_present(
    imaging: tuple[TestClient, str, Settings], name: str
) -> None:
    client, key, _ = imaging
    ds = pydicom.dcmread(io.BytesIO(_predict(client, key, _file(name), accept=DICOM)))
    assert ds.VerificationFlag == "UNVERIFIED"
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type is not None
    assert group.finding_type.value == "82334004"  # SCT Indeterminate
    assert group.get_qualitative_evaluations() == []
    (score,) = group.get_measurements()
    assert score.name.value == "ood-score"
    assert score.value > _threshold(client, key)


@pytest.mark.parametrize("name", RG1)
def test_the_fhir_answer_for_a_real_chest_radiograph_is_indeterminate_without_probability(
    imaging: tuple[TestClient, str, Settings], name: str
) -> None:
    client, key, _ = imaging
    body = _file(name)
    resource = json.loads(_predict(client, key, body, accept="application/fhir+json"))
    RiskAssessment.model_validate(resource)
    (only,) = resource["prediction"]
    assert only["outcome"] == {"text": "indeterminate"}
    assert "probabilityDecimal" not in only
    assert only["rationale"].startswith(OUTSIDE)
    assert f"threshold {_threshold(client, key):.4g}" in only["rationale"]
    study = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).StudyInstanceUID
    assert {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}} in (
        resource["basis"]
    )


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "MR2_UNCR.dcm", "CT_small.dcm"])
def test_other_anatomy_under_a_chest_header_is_indeterminate(
    imaging: tuple[TestClient, str, Settings], name: str
) -> None:
    client, key, _ = imaging
    _indeterminate(_predict(client, key, _as_chest_cr(name)), _threshold(client, key))


def test_a_blank_image_is_indeterminate_by_the_content_checks(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    answer = _predict(client, key, _with_pixels(np.full((256, 256), 2000)))
    _indeterminate(answer, _threshold(client, key))
    assert "content" in [r["code"] for r in answer["validated_input"]["reasons"]]


def test_noise_is_indeterminate(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    noise = np.random.default_rng(7).integers(0, 4096, size=(256, 256))
    _indeterminate(_predict(client, key, _with_pixels(noise)), _threshold(client, key))


@pytest.mark.parametrize(("seed", "positive"), [(101, False), (102, True), (103, False), (104, True)])
def test_in_distribution_phantoms_still_get_decisions(
    imaging: tuple[TestClient, str, Settings], seed: int, positive: bool
) -> None:
    client, key, _ = imaging
    answer = _predict(client, key, study_bytes(seed=seed, positive=positive, rows=256))
    assert answer["decision"]["indeterminate"] is False
    assert answer["decision"]["label"] in {"normal", "pneumonia"}
    assert answer["validated_input"]["inside"] is True
    assert answer["validated_input"]["score"] <= _threshold(client, key)


def test_indeterminate_answers_are_audited_and_counted(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, settings = imaging
    _predict(client, key, _file("RG1_J2KR.dcm"))
    metrics = client.get("/metrics").text
    counted = re.search(
        r'medinfer_indeterminate_total\{model="cxr-pneumonia",reason="ood_score",version="\d+"\} (\d+)', metrics
    )
    assert counted is not None, metrics
    assert int(float(counted.group(1))) >= 1
    assert re.search(r'medinfer_predictions_total\{label="indeterminate",model="cxr-pneumonia"', metrics)
    with sqlite3.connect(settings.data_dir / "medinfer.db") as db:
        details = [
            json.loads(row[0]) for row in db.execute("SELECT detail FROM audit_event WHERE action = 'inference'")
        ]
    verdicts = [v for d in details for v in d.get("ood", [])]
    assert any(v["outside"] and v["reasons"] == ["ood_score"] for v in verdicts)
    assert any(not v["outside"] for v in verdicts)
