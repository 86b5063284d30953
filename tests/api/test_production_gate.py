"""A production start with the shipped models sends no SR to a PACS, and says why.

The service runs as the container image runs it (``env=production``, real secrets, the real
``models/`` repository, the DIMSE SCP and STOW-RS on, a PACS destination set) against a real
DICOM Storage SCP on loopback that counts what it receives. Both shipped models are marked
``not_for_clinical_use``, so:

* as shipped (nothing acknowledged, no routing rule), neither model is served, ``/readyz`` is
  ready and names both as ``model-not-acknowledged``; a real chest CR (pydicom-data's RG1) sent
  by STOW-RS or C-STORE is refused with the no-route reason; no outbox row, nothing delivered;
* with the CXR model acknowledged and a routing rule set, a study is inferred and audited, but
  its SR is never queued for the PACS; the withheld metric counts it, and an operator's
  ``medinfer outbox requeue`` has nothing to release.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

from app.__main__ import main as cli
from app.config import Settings
from app.domain import Scope
from app.inference.spec import load_spec
from app.main import create_app
from app.transport.dimse.scp import ScpConfig, StoreScp
from app.transport.dimse.status import NO_ROUTE
from app.transport.http.stow import FailureReason
from tests.conftest import REPO_ROOT, register, wait_ready
from tests.integration.conftest import free_port
from tests.support.imaging import c_store, stow, until
from training.dicom_studies import study_bytes

SHIPPED_MODELS = ("cxr-pneumonia", "ehr-heart-disease")
CXR = "cxr-pneumonia"
CXR_ROUTE = json.dumps([{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": CXR}])


class CountingPacs:
    """A PACS that records every object it is sent."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self._lock = threading.Lock()

    def store(self, encoded: bytes, calling_ae: str) -> None:
        del calling_ae
        with self._lock:
            self.received.append(encoded)


@pytest.fixture
def pacs() -> Iterator[tuple[CountingPacs, int]]:
    port = free_port()
    sink = CountingPacs()
    scp = StoreScp(ScpConfig("HOSPITALPACS", "127.0.0.1", port, (), 4), sink)
    scp.start()
    try:
        yield sink, port
    finally:
        scp.stop()


@pytest.fixture
def production(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pacs: tuple[CountingPacs, int]
) -> Callable[..., Settings]:
    """Production settings as the image ships them, plus a PACS destination and the SCP on."""

    def make(**overrides: Any) -> Settings:
        settings = Settings(
            env="production",
            data_dir=tmp_path / "var",
            model_repository=REPO_ROOT / "models",
            audit_hmac_key="a-real-audit-hmac-key-of-forty-characters",
            pseudonym_key="a-real-pseudonym-key-of-forty-characters!",
            key_encryption_key="a-real-key-encryption-key-forty-chars-!!",
            dimse_enabled=True,
            dimse_port=0,
            pacs_destination=f"dimse://HOSPITALPACS@127.0.0.1:{pacs[1]}",
            pacs_retry_base_s=0.2,
            study_settle_s=0.2,
            **overrides,
        )
        # Production refuses to start without the audit checkpoint key, made outside the service.
        key = settings.resolved_checkpoint_key
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        # The CLI (migrate, outbox) reads the environment, as in the container.
        monkeypatch.setenv("MEDINFER_ENV", "production")
        monkeypatch.setenv("MEDINFER_DATA_DIR", str(settings.data_dir))
        for name in ("audit_hmac_key", "pseudonym_key", "key_encryption_key"):
            monkeypatch.setenv(f"MEDINFER_{name.upper()}", getattr(settings, name).get_secret_value())
        assert cli(["migrate"]) == 0
        return settings

    return make


def _rg1() -> bytes:
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert path is not None, "pydicom-data's RG1_UNCR.dcm is not installed"
    return Path(path).read_bytes()


def _c_store(client: TestClient, encoded: bytes) -> int:
    return int(c_store(client.app.state.dimse_port, encoded).Status)  # type: ignore[attr-defined]


def _rows(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(settings.data_dir / "medinfer.db") as db:
        return db.execute(sql).fetchall()


def _metric(client: TestClient, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_as_shipped_nothing_is_served_routed_or_sent_and_readyz_says_why(
    production: Callable[..., Settings], pacs: tuple[CountingPacs, int]
) -> None:
    settings = production()
    assert settings.acknowledged_nonclinical_models == []
    assert settings.imaging_routes is None
    key = register(settings, Scope.INFER, client_id="hospital-pacs")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        ready = client.get("/readyz")
        assert ready.status_code == 200  # a deliberate policy, not a fault: the replica is ready
        refused = {m["model"]: m for m in ready.json()["models"]}
        assert set(refused) == set(SHIPPED_MODELS)
        for name, row in refused.items():
            assert row["state"] == "failed"
            assert row["error_code"] == "model-not-acknowledged"
            assert "MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS" in row["error"]
            assert _metric(client, "medinfer_model_versions_refused_total", model=name, reason="not_acknowledged") >= 1

        response = stow(client, key, _rg1())
        assert response.status_code == 409, response.text
        (failed,) = pydicom.Dataset.from_json(response.json()).FailedSOPSequence
        assert int(failed.FailureReason) == FailureReason.SOP_CLASS_NOT_SUPPORTED
        assert _c_store(client, _rg1()) == NO_ROUTE
        assert _metric(client, "medinfer_dicom_instances_total", outcome="no-route") == 2
    assert _rows(settings, "SELECT count(*) FROM pacs_outbox") == [(0,)]
    assert not list((settings.data_dir / "spool").glob("*.dcm"))
    assert pacs[0].received == []


def test_an_acknowledged_demo_model_is_inferred_and_audited_but_its_sr_never_reaches_the_pacs(
    production: Callable[..., Settings], pacs: tuple[CountingPacs, int], capsys: pytest.CaptureFixture[str]
) -> None:
    spec = load_spec(REPO_ROOT / "models" / CXR)
    (version,) = spec.served_versions()
    settings = production(acknowledged_nonclinical_models=[f"{CXR}@{version}"], imaging_routes=CXR_ROUTE)
    key = register(settings, Scope.INFER, client_id="hospital-pacs")
    # An in-distribution phantom with consolidation: the case where a "Present" finding would be coded.
    study = study_bytes(seed=1, positive=True, rows=256)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        states = {m["model"]: (m["state"], m["error_code"]) for m in client.get("/readyz").json()["models"]}
        assert states == {CXR: ("ready", None), "ehr-heart-disease": ("failed", "model-not-acknowledged")}

        assert stow(client, key, study).status_code == 200
        assert _c_store(client, _rg1()) == 0x0000  # routed and spooled: the SCP acknowledges it
        until(lambda: _metric(client, "medinfer_studies_total", outcome="withheld") == 2)
        withheld = _metric(client, "medinfer_results_withheld_total", model=CXR, version=version, destination="pacs")
        assert withheld == 2
        assert _metric(client, "medinfer_pacs_outbox_events_total") == 0
    inferences = _rows(settings, "SELECT model, outcome FROM audit_event WHERE action = 'inference'")
    assert [model for model, _ in inferences] == [CXR, CXR]
    assert _rows(settings, "SELECT count(*) FROM pacs_outbox") == [(0,)]
    assert not list((settings.data_dir / "spool").glob("*.dcm"))

    capsys.readouterr()
    assert cli(["outbox", "requeue", "--state", "held", "--state", "failed"]) == 0
    assert json.loads(capsys.readouterr().out) == {"requeued": 0}  # nothing an operator could release
    assert pacs[0].received == []
