"""End to end with a real PACS: dcmtk's storescu sends a study to Orthanc, Orthanc routes it by
C-STORE to medinfer's SCP (a Lua auto-routing rule, set up by scripts/test-services.sh),
medinfer infers it and C-STOREs the DICOM SR back, and the test finds the SR in Orthanc over
DICOMweb (QIDO-RS, then WADO-RS) with the real ``dicomweb-client`` package. STOW-RS into medinfer
is driven by the same package."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from app.inference.spec import load_spec
from tests.conftest import REPO_ROOT, require_env
from tests.integration.conftest import Served, base_env, free_port, medinfer, register_key, serve
from tests.support.dcmtk import dcmtk
from training.dicom_studies import write_phantom_study

pytestmark = pytest.mark.integration

MARKER_ID = "MRN-PACS-5521-QV"
CXR_ROUTE = json.dumps([{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": "cxr-pneumonia"}])
MARKER_NAME = "Pacsmarker^Ottoline"


@contextlib.contextmanager
def _node(tmp_path: Path, routes: str) -> Iterator[tuple[Served, int, dict[str, str]]]:
    """medinfer with its SCP on, sending SR to Orthanc; Orthanc knows it as modality 'medinfer'."""
    orthanc = require_env("MEDINFER_TEST_ORTHANC_URL")
    scp_port = free_port()
    env = base_env(tmp_path, REPO_ROOT / "models", None) | {
        "MEDINFER_DIMSE_ENABLED": "true",
        "MEDINFER_DIMSE_PORT": str(scp_port),
        "MEDINFER_DIMSE_AE_TITLE": "MEDINFER",
        "MEDINFER_DIMSE_ALLOWED_CALLING_AES": '["ORTHANC", "STORESCU"]',
        "MEDINFER_PACS_DESTINATION": f"dimse://{require_env('MEDINFER_TEST_ORTHANC_AET')}@127.0.0.1:"
        + require_env("MEDINFER_TEST_ORTHANC_DICOM_PORT"),
        "MEDINFER_STUDY_SETTLE_S": "1.0",
        # Routing is the site's choice: nothing is routed unless a rule names the model.
        "MEDINFER_IMAGING_ROUTES": routes,
    }
    assert medinfer(env, "migrate").returncode == 0
    served = serve(env, tmp_path / "medinfer.log")
    response = httpx.put(
        f"{orthanc}/modalities/medinfer", json={"AET": "MEDINFER", "Host": "127.0.0.1", "Port": scp_port}, timeout=10
    )
    assert response.status_code == 200, response.text
    try:
        yield served, scp_port, env
    finally:
        httpx.delete(f"{orthanc}/modalities/medinfer", timeout=10)
        served.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Served, int, dict[str, str]]]:
    with _node(tmp_path, CXR_ROUTE) as started:
        yield started


@pytest.fixture
def explaining_node(tmp_path: Path) -> Iterator[tuple[Served, int, dict[str, str]]]:
    """The same, with a routing rule that asks for the model's explanation."""
    routes = json.dumps([{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": "cxr-pneumonia", "explain": True}])
    with _node(tmp_path, routes) as started:
        yield started


def _relabelled(source: bytes | Path, study: str, syntax: str | None = None) -> pydicom.Dataset:
    """Real pixels under new Study/Series/SOP UIDs and marker patient identifiers."""
    ds = pydicom.dcmread(source if isinstance(source, Path) else io.BytesIO(source))
    if syntax is not None:
        ds.compress(syntax)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.PatientName = MARKER_ID, MARKER_NAME
    return ds


#: storescu proposes uncompressed syntaxes unless told which compressed one the file holds.
PROPOSE = {
    "1.2.840.10008.1.2.4.90": "--propose-j2k-lossless",
    "1.2.840.10008.1.2.4.91": "--propose-j2k-lossy",
    RLELossless: "--propose-rle",
    JPEGLSLossless: "--propose-jls-lossless",
}


def _storescu(path: Path) -> None:
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    flags = [PROPOSE[syntax]] if syntax in PROPOSE else []
    result = subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            "STORESCU",
            "-aec",
            require_env("MEDINFER_TEST_ORTHANC_AET"),
            *flags,
            "127.0.0.1",
            require_env("MEDINFER_TEST_ORTHANC_DICOM_PORT"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _find_sr(client: DICOMwebClient, study: str, timeout_s: float = 90, modality: str = "SR") -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = client.search_for_series(study_instance_uid=study, search_filters={"Modality": modality})
        if found:
            return found
        time.sleep(0.5)
    return []


SOURCES = [
    ("RG1_UNCR.dcm", None),
    ("RG1_J2KR.dcm", None),
    ("RG1_J2KI.dcm", None),
    ("RG1_UNCR.dcm", RLELossless),
    ("RG1_UNCR.dcm", JPEGLSLossless),
]


@pytest.mark.parametrize(("name", "syntax"), SOURCES, ids=[f"{n}-{s or 'as-is'}" for n, s in SOURCES])
def test_storescu_to_orthanc_routes_to_medinfer_and_the_sr_comes_back(
    node: tuple[Served, int, dict[str, str]], tmp_path: Path, name: str, syntax: str | None
) -> None:
    served, _, _ = node
    path = get_testdata_file(name, download=False)
    assert path is not None
    study = generate_uid()
    image = _relabelled(Path(path), study, syntax)
    image.save_as(tmp_path / "image.dcm", enforce_file_format=True)
    _storescu(tmp_path / "image.dcm")

    orthanc = DICOMwebClient(url=require_env("MEDINFER_TEST_ORTHANC_URL") + "/dicom-web")
    series = _find_sr(orthanc, study)
    assert len(series) == 1, served.log_path.read_text()[-4000:]
    sr_series = series[0]["0020000E"]["Value"][0]
    (sr,) = orthanc.retrieve_series(study, sr_series)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == study
    assert sr.PatientID == MARKER_ID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == image.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence] == [image.SOPInstanceUID]
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if e.ManufacturerModelName == "cxr-pneumonia"]
    assert equipment.SoftwareVersions[0] == load_spec(REPO_ROOT / "models" / "cxr-pneumonia").served_versions()[-1]
    assert equipment.DeviceUID
    text = str(sr)
    assert "NOT FOR CLINICAL USE" in text.upper()
    # No patient identifier reached the logs.
    log = served.log_path.read_text()
    assert MARKER_ID not in log
    assert MARKER_NAME not in log


def test_a_multi_image_study_settles_into_one_sr_referencing_every_image(
    node: tuple[Served, int, dict[str, str]], tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    paths = []
    for seed in range(3):
        path = tmp_path / f"p{seed}.dcm"
        write_phantom_study(
            path, seed=seed, positive=seed == 1, rows=512, study_uid=study, series_uid=series,
            patient_id=MARKER_ID, patient_name=MARKER_NAME,
        )  # fmt: skip
        paths.append(path)
    for path in paths:
        _storescu(path)
    orthanc = DICOMwebClient(url=require_env("MEDINFER_TEST_ORTHANC_URL") + "/dicom-web")
    found = _find_sr(orthanc, study)
    assert len(found) == 1
    (sr,) = orthanc.retrieve_series(study, found[0]["0020000E"]["Value"][0])
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    }
    assert referenced == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


def test_stow_rs_with_dicomweb_client_then_sr_reaches_orthanc(
    node: tuple[Served, int, dict[str, str]], tmp_path: Path
) -> None:
    served, _, env = node
    key = register_key(env, "stow-client", "infer")
    study = generate_uid()
    path = get_testdata_file("RG1_J2KR.dcm", download=False)
    assert path is not None
    image = _relabelled(Path(path), study)
    medinfer = DICOMwebClient(url=served.base_url + "/dicomweb", headers={"Authorization": f"Bearer {key}"})
    result = medinfer.store_instances([image], study_instance_uid=study)
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [image.SOPInstanceUID]

    orthanc = DICOMwebClient(url=require_env("MEDINFER_TEST_ORTHANC_URL") + "/dicom-web")
    assert len(_find_sr(orthanc, study)) == 1


def test_c_store_of_an_image_no_model_takes_is_refused_with_a_failure_status(
    node: tuple[Served, int, dict[str, str]],
) -> None:
    _, scp_port, _ = node
    path = get_testdata_file("MR_small.dcm", download=False)
    assert path is not None
    result = subprocess.run(
        [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", "MEDINFER", "127.0.0.1", str(scp_port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    # 0xC215 (no routing rule takes an MR; app/transport/dimse/status.py) is in the
    # "Cannot understand" range, which is how storescu names it. Never Success.
    assert "Received Store Response (Error: CannotUnderstand)" in output, output
    assert "Success" not in output


def test_c_store_from_an_unlisted_calling_ae_is_rejected(node: tuple[Served, int, dict[str, str]]) -> None:
    _, scp_port, _ = node
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert path is not None
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "INTRUDER", "-aec", "MEDINFER", "127.0.0.1", str(scp_port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "reject" in (result.stdout + result.stderr).lower()


def _referenced_uids(item: pydicom.Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID in an SR content tree."""
    found = set()
    for child in item.get("ContentSequence", []):
        for ref in child.get("ReferencedSOPSequence", []):
            found.add(str(ref.ReferencedSOPInstanceUID))
        found |= _referenced_uids(child)
    return found


def test_an_explained_study_sends_its_saliency_map_and_an_sr_that_references_it(
    explaining_node: tuple[Served, int, dict[str, str]], tmp_path: Path
) -> None:
    """storescu -> Orthanc -> medinfer (route with explain) -> Segmentation + SR back in Orthanc,
    each found by QIDO and read by WADO, and their references agree: the SR names the map and
    the image, the map names the image and has its geometry."""
    served, _, _ = explaining_node
    study = generate_uid()
    path = tmp_path / "positive.dcm"
    write_phantom_study(
        path, seed=1, positive=True, rows=512, study_uid=study, patient_id=MARKER_ID, patient_name=MARKER_NAME
    )
    image = pydicom.dcmread(path)
    _storescu(path)

    orthanc = DICOMwebClient(url=require_env("MEDINFER_TEST_ORTHANC_URL") + "/dicom-web")
    srs = _find_sr(orthanc, study)
    assert len(srs) == 1, served.log_path.read_text()[-4000:]
    segs = _find_sr(orthanc, study, modality="SEG", timeout_s=10)
    assert len(segs) == 1
    (sr,) = orthanc.retrieve_series(study, srs[0]["0020000E"]["Value"][0])
    (seg,) = orthanc.retrieve_series(study, segs[0]["0020000E"]["Value"][0])

    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.SegmentationType == "FRACTIONAL"
    assert (seg.Rows, seg.Columns) == (image.Rows, image.Columns)
    assert seg.StudyInstanceUID == study
    assert seg.PatientID == MARKER_ID
    sources = {str(ref.ReferencedSOPInstanceUID) for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert sources == {image.SOPInstanceUID}
    hd.seg.Segmentation.from_dataset(seg)  # a conformant object that highdicom reads back

    assert _referenced_uids(sr) >= {image.SOPInstanceUID, seg.SOPInstanceUID}
    evidence = {
        str(ref.ReferencedSOPInstanceUID)
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {image.SOPInstanceUID, seg.SOPInstanceUID}
    log = served.log_path.read_text()
    assert MARKER_ID not in log
    assert MARKER_NAME not in log
