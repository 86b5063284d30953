"""The imaging path over HTTP on the real cxr-pneumonia model: DICOM instances and series to
``/predict`` (JSON or DICOM SR back), and DICOMweb STOW-RS into the asynchronous path."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pydicom
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGLSLossless, RLELossless, generate_uid

from app.config import Settings
from app.domain import Scope
from app.inference.spec import load_spec
from app.main import create_app
from tests.conftest import REPO_ROOT, register, wait_ready
from training.dicom_studies import reference_preprocess, study_bytes

MODEL = "cxr-pneumonia"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
MARKER_ID = "MRN-IMG-7731-XQ"
MARKER_NAME = "Zzyzx^Quintilla"
#: Studies a PACS sends reach a model only through the site's routing rules.
CXR_ROUTE = json.dumps([{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": MODEL}])


@pytest.fixture
def imaging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, str, Settings]]:
    repo = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)
    settings = Settings(
        env="test", data_dir=tmp_path / "var", model_repository=repo, study_settle_s=0.2, imaging_routes=CXR_ROUTE
    )
    monkeypatch.setenv("MEDINFER_DATA_DIR", str(settings.data_dir))
    from app.__main__ import main as cli

    assert cli(["migrate"]) == 0
    key = register(settings, Scope.INFER, Scope.AUDIT_READ, client_id="pacs")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client, key, settings


def _rg1(name: str = "RG1_UNCR.dcm") -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(path).read_bytes()


def _transcoded(syntax: str) -> bytes:
    """RG1's real pixels re-encoded by pydicom (RLE, JPEG-LS lossless) or deflated."""
    ds = pydicom.dcmread(io.BytesIO(_rg1()))
    if syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    else:
        ds.compress(syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _phantom(seed: int, **kwargs: Any) -> bytes:
    kwargs.setdefault("patient_id", MARKER_ID)
    kwargs.setdefault("patient_name", MARKER_NAME)
    kwargs.setdefault("rows", 256)
    return study_bytes(seed=seed, positive=bool(seed % 2), **kwargs)


def _related(parts: list[bytes], boundary: str = "medinfer-test-boundary") -> tuple[str, bytes]:
    body = b"".join(f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return f'multipart/related; type="{DICOM}"; boundary={boundary}', body + f"--{boundary}--\r\n".encode()


def _predict(client: TestClient, key: str, body: bytes, media: str = DICOM, **headers: str) -> Any:
    return client.post(
        f"/v1/models/{MODEL}/predict",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": media, **headers},
    )


def _reference_probability(encoded: bytes, version: str) -> float:
    session = ort.InferenceSession(
        str(REPO_ROOT / "models" / MODEL / version / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    tensor = reference_preprocess(pydicom.dcmread(io.BytesIO(encoded)))
    return float(session.run(["probabilities"], {"image": tensor})[0][0][1])


def _audited_outputs(settings: Settings, request_id: str) -> dict[str, Any]:
    with sqlite3.connect(settings.data_dir / "medinfer.db") as db:
        rows = db.execute(
            "SELECT detail FROM audit_event WHERE action = 'inference' AND request_id = ?", (request_id,)
        ).fetchall()
    (detail,) = [json.loads(row[0]) for row in rows]
    outputs: dict[str, Any] = detail["outputs"]
    return outputs


@pytest.mark.parametrize(
    "source",
    [
        "RG1_UNCR.dcm",
        "RG1_UNCI.dcm",
        "RG1_J2KR.dcm",
        "RG1_J2KI.dcm",
        RLELossless,
        JPEGLSLossless,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_real_chest_cr_in_every_transfer_syntax_gives_the_reference_probability(
    imaging: tuple[TestClient, str, Settings], source: str
) -> None:
    client, key, settings = imaging
    encoded = _rg1(source) if source.endswith(".dcm") else _transcoded(source)
    response = _predict(client, key, encoded)
    assert response.status_code == 200, response.text
    answer = response.json()
    ds = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True)
    assert answer["model"]["name"] == MODEL
    assert answer["model"]["not_for_clinical_use"] is True
    assert len(answer["model"]["sha256"]) == 64
    assert answer["model"]["intended_use"]
    assert answer["input"]["study_instance_uid"] == ds.StudyInstanceUID
    assert answer["input"]["series_instance_uids"] == [ds.SeriesInstanceUID]
    assert answer["input"]["sop_instance_uids"] == [ds.SOPInstanceUID]
    assert set(answer["timing_ms"]) == {"preprocess", "queue", "inference"}
    version = answer["model"]["version"]
    reference = _reference_probability(encoded, version)
    if load_spec(REPO_ROOT / "models" / MODEL).ood_of(version) is None:
        assert answer["decision"]["label"] in {"normal", "pneumonia"}
        assert answer["probabilities"]["pneumonia"] == pytest.approx(reference, abs=1e-4)
    else:
        # The model was trained on phantoms: a real radiograph is outside its validated input, and
        # the honest answer is no decision, with the detector's score, and no probability shown.
        assert answer["decision"]["label"] == "indeterminate"
        assert answer["decision"]["positive"] is None
        assert answer["probabilities"] is None
        assert answer["validated_input"]["inside"] is False
        assert answer["validated_input"]["score"] is not None
        # Every transfer syntax still decodes to the reference pixels: the audited raw output
        # equals the reference pipeline's.
        (probabilities,) = _audited_outputs(settings, answer["request_id"])["probabilities"]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert probabilities[1] == pytest.approx(reference, abs=1e-4)


def test_a_series_is_one_study_decided_by_its_most_suspicious_image(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    study, series = generate_uid(), generate_uid()
    parts = [_phantom(seed, study_uid=study, series_uid=series) for seed in (10, 11, 12)]
    media, body = _related(parts)
    response = _predict(client, key, body, media)
    assert response.status_code == 200, response.text
    answer = response.json()
    per_image = [i["probabilities"]["pneumonia"] for i in answer["input"]["instances"]]
    assert len(per_image) == 3
    assert answer["probabilities"]["pneumonia"] == pytest.approx(max(per_image))
    assert answer["input"]["study_instance_uid"] == study


def test_accept_dicom_answers_an_unverified_sr_in_the_same_study(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    encoded = _rg1()
    response = _predict(client, key, encoded, Accept=DICOM)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM
    sr = pydicom.dcmread(io.BytesIO(response.content))
    source = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in evidence] == [source.SOPInstanceUID]


def _pixel_bomb() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_phantom(1)))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _without_pixels() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_phantom(1)))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _unknown_syntax() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_phantom(1)))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: not an image codec we read
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _mr() -> bytes:
    path = get_testdata_file("MR_small.dcm", download=False)
    assert path is not None
    return Path(path).read_bytes()


BAD_INPUTS = {
    "not-dicom": (lambda: b"%PDF-1.7 definitely not DICOM" * 10, 400, "dicom-malformed"),
    "truncated": (lambda: _rg1()[:5000], 400, "dicom-malformed"),
    "missing-pixel-data": (_without_pixels, 400, "dicom-malformed"),
    "unsupported-syntax": (_unknown_syntax, 415, "dicom-unsupported"),
    "wrong-modality": (_mr, 422, "dicom-not-accepted"),
    "pixel-bomb": (_pixel_bomb, 413, "dicom-too-large"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_dicom_gets_a_specific_problem_not_a_500(imaging: tuple[TestClient, str, Settings], case: str) -> None:
    client, key, _ = imaging
    make, status, code = BAD_INPUTS[case]
    started = time.monotonic()
    response = _predict(client, key, make())
    assert time.monotonic() - started < 10
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert MARKER_ID not in response.text


def test_a_series_mixing_studies_is_refused_with_409(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    media, body = _related([_phantom(1, study_uid=generate_uid()), _phantom(2, study_uid=generate_uid())])
    response = _predict(client, key, body, media)
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "study-mismatch"


def test_refusals_and_results_are_audited_without_identifiers_in_clear(
    imaging: tuple[TestClient, str, Settings],
) -> None:
    client, key, settings = imaging
    assert _predict(client, key, _phantom(3)).status_code == 200
    assert _predict(client, key, _pixel_bomb()).status_code == 413
    events = client.get("/v1/audit/events", headers={"Authorization": f"Bearer {key}"}).json()
    outcomes = [(e["action"], e["outcome"]) for e in events["events"] if e["action"] == "inference"]
    assert ("inference", "success") in outcomes
    database = (settings.data_dir / "medinfer.db").read_bytes()
    assert MARKER_ID.encode() not in database
    assert MARKER_NAME.encode() not in database


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_dicom_never_gets_a_5xx(imaging: tuple[TestClient, str, Settings], data: st.DataObject) -> None:
    client, key, _ = imaging
    original = bytearray(_phantom(5, rows=64))
    flips = data.draw(st.lists(st.integers(0, len(original) - 1), max_size=8))
    for position in flips:
        original[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(original)))
    response = _predict(client, key, bytes(original[:cut]))
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.headers["content-type"] == "application/problem+json"


# -- STOW-RS ---------------------------------------------------------------------------------


def _stow(client: TestClient, key: str, parts: list[bytes], path: str = "/dicomweb/studies") -> Any:
    media, body = _related(parts)
    return client.post(path, content=body, headers={"Authorization": f"Bearer {key}", "Content-Type": media})


def _wait_outbox(settings: Settings, rows: int, timeout_s: float = 30) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout_s
    found: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        with sqlite3.connect(settings.data_dir / "medinfer.db") as db:
            found = db.execute("SELECT sop_instance_uid, state FROM pacs_outbox").fetchall()
        if len(found) >= rows:
            return found
        time.sleep(0.1)
    return found


def test_stow_stores_all_then_infers_the_study_into_the_outbox(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, settings = imaging
    study = generate_uid()
    parts = [_phantom(seed, study_uid=study) for seed in (20, 21)]
    response = _stow(client, key, parts)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    stored = pydicom.Dataset.from_json(response.json())
    assert len(stored.ReferencedSOPSequence) == 2
    assert "FailedSOPSequence" not in stored
    rows = _wait_outbox(settings, 1)
    assert len(rows) == 1
    assert rows[0][1] == "held"  # no PACS destination configured: the SR waits
    with sqlite3.connect(settings.data_dir / "medinfer.db") as db:
        ((sealed,),) = db.execute("SELECT payload FROM pacs_outbox").fetchall()
    assert sealed.startswith(b"MISEAL1\n")  # the SR names the patient: sealed in its row
    assert MARKER_ID.encode() not in sealed
    assert not [p for p in (settings.data_dir / "spool").iterdir() if not p.name.startswith(".")]


def test_stow_answers_202_with_failure_reasons_when_some_fail(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    response = _stow(client, key, [_phantom(30), b"not dicom at all", _mr()])
    assert response.status_code == 202, response.text
    assert response.headers["content-type"] == DICOM_JSON
    result = pydicom.Dataset.from_json(response.json())
    assert len(result.ReferencedSOPSequence) == 1
    reasons = sorted(int(item.FailureReason) for item in result.FailedSOPSequence)
    assert len(reasons) == 2
    assert all(reason != 0 for reason in reasons)


def test_stow_answers_409_when_none_stored(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    response = _stow(client, key, [b"garbage", _pixel_bomb()])
    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == DICOM_JSON
    assert len(pydicom.Dataset.from_json(response.json()).FailedSOPSequence) == 2


def test_stow_to_a_study_refuses_instances_of_another_study(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    target = generate_uid()
    response = _stow(
        client,
        key,
        [_phantom(40, study_uid=target), _phantom(41, study_uid=generate_uid())],
        f"/dicomweb/studies/{target}",
    )
    assert response.status_code == 202, response.text
    result = pydicom.Dataset.from_json(response.json())
    assert len(result.ReferencedSOPSequence) == 1
    assert len(result.FailedSOPSequence) == 1


def test_stow_accepts_a_chunked_body_without_content_length(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    media, body = _related([_phantom(50), _phantom(51)])

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 7777):
            yield body[start : start + 7777]

    response = client.post(
        "/dicomweb/studies", content=chunks(), headers={"Authorization": f"Bearer {key}", "Content-Type": media}
    )
    assert response.status_code == 200, response.text
    assert len(pydicom.Dataset.from_json(response.json()).ReferencedSOPSequence) == 2


def test_stow_without_a_boundary_is_a_400_problem(imaging: tuple[TestClient, str, Settings]) -> None:
    client, key, _ = imaging
    response = client.post(
        "/dicomweb/studies",
        content=b"--x\r\n\r\n",
        headers={"Authorization": f"Bearer {key}", "Content-Type": 'multipart/related; type="application/dicom"'},
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"


def test_stow_needs_the_infer_scope(imaging: tuple[TestClient, str, Settings]) -> None:
    client, _, settings = imaging
    reader = register(settings, Scope.MODELS_READ, client_id="reader")
    response = _stow(client, reader, [_phantom(60)])
    assert response.status_code == 403
    assert json.loads(response.text)["code"] == "forbidden"
