"""The PACS test harness itself: Orthanc takes a real C-STORE from dcmtk's storescu and serves
the study over DICOMweb. The imaging path's tests (C-STORE in, SR back to PACS) stand on this."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import require_env
from tests.support.dcmtk import dcmtk

pytestmark = pytest.mark.integration


def test_orthanc_accepts_storescu_and_answers_qido(tmp_path: Path) -> None:
    orthanc = require_env("MEDINFER_TEST_ORTHANC_URL")
    port = require_env("MEDINFER_TEST_ORTHANC_DICOM_PORT")
    source = get_testdata_file("CT_small.dcm", download=False)
    assert source is not None
    study_uid = dcmread(source).StudyInstanceUID

    result = subprocess.run(
        [dcmtk("storescu"), "-aec", require_env("MEDINFER_TEST_ORTHANC_AET"), "127.0.0.1", port, str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    studies = httpx.get(f"{orthanc}/dicom-web/studies", params={"StudyInstanceUID": study_uid}, timeout=10)
    assert studies.status_code == 200
    assert [s["0020000D"]["Value"][0] for s in studies.json()] == [study_uid]
