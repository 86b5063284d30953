"""The asynchronous imaging path's promises: a PACS that is down gets each result exactly once
when it comes back, a restart loses no accepted instance, and a full spool refuses instead of
accepting (C-STORE 0xA700, STOW FailureReason 0xA700), both below its free-space floor and on a
real filesystem that fills up (ENOSPC from the kernel). The "PACS" is a real DIMSE SCP
(medinfer's own StoreScp with a counting sink) on loopback."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from app.config import Settings
from app.domain import Scope
from app.main import create_app
from app.security.sealed import SealedFiles
from app.transport.dimse.scp import ScpConfig, StoreScp
from tests.conftest import REPO_ROOT, register, wait_ready
from tests.integration.conftest import free_port
from tests.support.imaging import c_store, stow, until
from training.dicom_studies import study_bytes

MODEL = "cxr-pneumonia"
CXR_ROUTE = json.dumps([{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": MODEL}])


class CountingPacs:
    """Records every object it is sent."""

    def __init__(self) -> None:
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()

    def store(self, encoded: bytes, calling_ae: str) -> None:
        del calling_ae
        with self._lock:
            self.received.append(pydicom.dcmread(io.BytesIO(encoded)))


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    repo = tmp_path / "models"
    if not repo.exists():
        shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)
    overrides.setdefault("imaging_routes", CXR_ROUTE)  # studies reach a model only through a site rule
    return Settings(env="test", data_dir=tmp_path / "var", model_repository=repo, **overrides)


@pytest.fixture
def migrate(monkeypatch: pytest.MonkeyPatch) -> Callable[[Settings], str]:
    def run(settings: Settings) -> str:
        monkeypatch.setenv("MEDINFER_DATA_DIR", str(settings.data_dir))
        from app.__main__ import main as cli

        assert cli(["migrate"]) == 0
        return register(settings, Scope.INFER, client_id="pacs-router")

    return run


def _outbox(settings: Settings) -> list[tuple[str, str, int]]:
    with sqlite3.connect(settings.data_dir / "medinfer.db") as db:
        return db.execute("SELECT sop_instance_uid, state, attempts FROM pacs_outbox").fetchall()


def _backlog(client: TestClient) -> dict[str, float]:
    """The outbox gauges as /metrics shows them: the count per state, and ``age`` of the oldest."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "medinfer_pacs_outbox_backlog":
                found[sample.labels["state"]] = sample.value
            elif sample.name == "medinfer_pacs_outbox_oldest_age_seconds":
                found["age"] = sample.value
    return found


# pynetdicom 3.0.4 drops its socket unclosed when a connect is refused (pydicom/pynetdicom#979,
# fixed upstream by #999); the PACS being down is exactly that case. CPython closes it at once.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_results_wait_for_a_pacs_that_is_down_and_arrive_exactly_once(
    tmp_path: Path, migrate: Callable[[Settings], str]
) -> None:
    port = free_port()
    settings = _settings(
        tmp_path, study_settle_s=0.2, pacs_destination=f"dimse://TESTPACS@127.0.0.1:{port}", pacs_retry_base_s=0.2
    )
    key = migrate(settings)
    study = generate_uid()
    pacs = CountingPacs()
    scp = StoreScp(ScpConfig("TESTPACS", "127.0.0.1", port, (), 4), pacs)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert stow(client, key, study_bytes(seed=1, positive=True, rows=256, study_uid=study)).status_code == 200
        until(lambda: any(attempts >= 2 for _, _, attempts in _outbox(settings)))
        assert [state for _, state, _ in _outbox(settings)] == ["pending"]
        # Hospital IT sees the result waiting: one undelivered, and for how long.
        until(lambda: _backlog(client).get("age", 0) > 0.5)
        waiting = _backlog(client)
        assert waiting["pending"] + waiting["sending"] == 1
        assert waiting["held"] == waiting["failed"] == 0
        scp.start()
        try:
            until(lambda: [state for _, state, _ in _outbox(settings)] == ["delivered"])
            time.sleep(1.5)  # several more outbox passes: nothing is sent again
            until(lambda: _backlog(client) == {"pending": 0, "sending": 0, "held": 0, "failed": 0, "age": 0})
        finally:
            scp.stop()
    (row,) = _outbox(settings)
    assert len(pacs.received) == 1
    sr = pacs.received[0]
    assert sr.SOPInstanceUID == row[0]
    assert sr.StudyInstanceUID == study
    assert sr.VerificationFlag == "UNVERIFIED"
    assert not (settings.data_dir / "outbox").exists()  # results live sealed in the database


@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_a_result_reaches_the_pacs_from_another_replica_after_its_own_is_gone_with_its_volume(
    tmp_path: Path, migrate: Callable[[Settings], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared.db"
    url = f"sqlite:///{shared}"
    monkeypatch.setenv("MEDINFER_DATABASE_URL", url)
    port = free_port()
    destination = f"dimse://TESTPACS@127.0.0.1:{port}"
    first = _settings(tmp_path, study_settle_s=0.2, pacs_destination=destination, pacs_retry_base_s=0.2)
    first = first.model_copy(update={"database_url": url, "data_dir": tmp_path / "replica-a"})
    key = migrate(first)

    def rows() -> list[tuple[str, str, bytes | None]]:
        with sqlite3.connect(shared) as db:
            return db.execute("SELECT sop_instance_uid, state, payload FROM pacs_outbox").fetchall()

    with TestClient(create_app(first), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert stow(client, key, study_bytes(seed=6, positive=True, rows=256)).status_code == 200
        until(lambda: len(rows()) == 1 and rows()[0][1] == "pending")
    ((uid, _, sealed),) = rows()
    assert sealed is not None
    assert sealed.startswith(b"MISEAL1\n")  # encrypted at rest, in the row
    assert uid.encode() not in sealed
    shutil.rmtree(first.data_dir)  # the replica is replaced, and its volume with it

    pacs = CountingPacs()
    scp = StoreScp(ScpConfig("TESTPACS", "127.0.0.1", port, (), 4), pacs)
    scp.start()
    try:
        second = first.model_copy(update={"data_dir": tmp_path / "replica-b"})
        with TestClient(create_app(second)) as client:
            wait_ready(client)
            until(lambda: [state for _, state, _ in rows()] == ["delivered"])
            time.sleep(1.5)  # more outbox passes: nothing is sent twice
    finally:
        scp.stop()
    assert [sr.SOPInstanceUID for sr in pacs.received] == [uid]
    assert rows() == [(uid, "delivered", None)]  # the PACS has it: the sealed copy is dropped


def test_a_result_queued_before_revision_0004_is_still_delivered_from_its_sealed_file(
    tmp_path: Path, migrate: Callable[[Settings], str]
) -> None:
    port = free_port()
    settings = _settings(tmp_path, pacs_destination=f"dimse://TESTPACS@127.0.0.1:{port}")
    migrate(settings)
    legacy = study_bytes(seed=7, positive=False, rows=64)
    uid = str(pydicom.dcmread(io.BytesIO(legacy)).SOPInstanceUID)
    files = SealedFiles(settings.data_dir / "outbox", settings.key_encryption_key.get_secret_value(), "outbox")
    path = files.write("0123456789abcdef.sr", legacy)
    with sqlite3.connect(settings.data_dir / "medinfer.db") as db:
        db.execute(
            "INSERT INTO pacs_outbox (created_at, destination, sop_instance_uid, payload_path, state, attempts,"
            " next_attempt_at) VALUES ('2026-11-28 10:00:00', 'old', ?, ?, 'pending', 0, '2026-11-28 10:00:00')",
            (uid, path.name),
        )
    pacs = CountingPacs()
    scp = StoreScp(ScpConfig("TESTPACS", "127.0.0.1", port, (), 4), pacs)
    scp.start()
    try:
        with TestClient(create_app(settings)) as client:
            wait_ready(client)
            until(lambda: [state for _, state, _ in _outbox(settings)] == ["delivered"])
    finally:
        scp.stop()
    assert [ds.SOPInstanceUID for ds in pacs.received] == [uid]
    assert not path.exists()


def test_a_graceful_stop_infers_the_studies_still_waiting_and_leaves_the_spool_empty(
    tmp_path: Path, migrate: Callable[[Settings], str]
) -> None:
    settings = _settings(tmp_path, study_settle_s=3600)
    key = migrate(settings)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert stow(client, key, study_bytes(seed=8, positive=True, rows=256)).status_code == 200
        assert stow(client, key, study_bytes(seed=9, positive=False, rows=256)).status_code == 200
        time.sleep(0.5)
        assert _outbox(settings) == []  # an hour from settling
    # The lifespan's shutdown inferred both before it returned: a replica that never comes back
    # (scaled away) strands nothing.
    assert sorted(state for _, state, _ in _outbox(settings)) == ["held", "held"]
    assert not [p for p in (settings.data_dir / "spool").iterdir() if p.suffix == ".dcm"]


def test_an_accepted_instance_survives_a_restart_before_its_study_settles(
    tmp_path: Path, migrate: Callable[[Settings], str]
) -> None:
    # No time to drain at the stop: as after a crash, the instance waits in the spool.
    slow = _settings(tmp_path, study_settle_s=3600, study_drain_s=0)
    key = migrate(slow)
    with TestClient(create_app(slow)) as client:
        wait_ready(client)
        assert stow(client, key, study_bytes(seed=2, positive=False, rows=256)).status_code == 200
    assert len([p for p in (slow.data_dir / "spool").iterdir() if p.suffix == ".dcm"]) == 1
    assert _outbox(slow) == []

    fast = _settings(tmp_path, study_settle_s=0.2)
    with TestClient(create_app(fast)) as client:
        wait_ready(client)
        until(lambda: len(_outbox(fast)) == 1)
        # No destination configured: the result is held, and the gauges say so.
        until(lambda: _backlog(client).get("held") == 1)
        assert _backlog(client)["pending"] == 0
    assert [state for _, state, _ in _outbox(fast)] == ["held"]
    assert not [p for p in (fast.data_dir / "spool").iterdir() if p.suffix == ".dcm"]


# See test_results_wait_for_a_pacs_that_is_down_and_arrive_exactly_once: the PACS is down at first.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_held_and_failed_results_reach_the_pacs_once_an_operator_requeues_them(
    tmp_path: Path, migrate: Callable[[Settings], str], capsys: pytest.CaptureFixture[str]
) -> None:
    from app.__main__ import main as cli

    port = free_port()
    destination = f"dimse://TESTPACS@127.0.0.1:{port}"
    unset = _settings(tmp_path, study_settle_s=0.2)
    key = migrate(unset)
    with TestClient(create_app(unset)) as client:
        wait_ready(client)
        assert stow(client, key, study_bytes(seed=4, positive=True, rows=256)).status_code == 200
        until(lambda: _backlog(client).get("held") == 1)
    # A destination that gives up at once while the PACS is down: the second result fails.
    impatient = _settings(tmp_path, study_settle_s=0.2, pacs_destination=destination, pacs_max_attempts=1)
    with TestClient(create_app(impatient)) as client:
        wait_ready(client)
        assert stow(client, key, study_bytes(seed=5, positive=False, rows=256)).status_code == 200
        until(lambda: _backlog(client).get("failed") == 1)
        assert _backlog(client)["held"] == 1  # nothing releases held results on its own
    assert sorted(state for _, state, _ in _outbox(unset)) == ["failed", "held"]

    capsys.readouterr()
    assert cli(["outbox", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["held"], status["failed"], status["pending"]) == (1, 1, 0)
    assert status["oldest_waiting_age_s"] > 0
    assert cli(["outbox", "requeue", "--state", "held", "--state", "failed"]) == 0
    assert json.loads(capsys.readouterr().out) == {"requeued": 2}
    with sqlite3.connect(unset.data_dir / "medinfer.db") as db:
        assert db.execute("SELECT count(*) FROM audit_event WHERE action = 'pacs.outbox.requeue'").fetchone() == (1,)

    pacs = CountingPacs()
    scp = StoreScp(ScpConfig("TESTPACS", "127.0.0.1", port, (), 4), pacs)
    scp.start()
    try:
        delivering = _settings(tmp_path, study_settle_s=0.2, pacs_destination=destination)
        with TestClient(create_app(delivering)) as client:
            wait_ready(client)
            until(lambda: [state for _, state, _ in _outbox(delivering)] == ["delivered", "delivered"])
            time.sleep(1.5)  # more outbox passes: nothing is sent twice
            until(lambda: _backlog(client) == {"pending": 0, "sending": 0, "held": 0, "failed": 0, "age": 0})
    finally:
        scp.stop()
    assert sorted(sr.SOPInstanceUID for sr in pacs.received) == sorted(uid for uid, _, _ in _outbox(unset))
    assert len(pacs.received) == 2


def test_a_full_spool_refuses_c_store_with_out_of_resources_and_stow_with_a700(
    tmp_path: Path, migrate: Callable[[Settings], str]
) -> None:
    settings = _settings(tmp_path, dimse_enabled=True, dimse_port=0, dicom_spool_min_free_bytes=2**62)
    key = migrate(settings)
    encoded = study_bytes(seed=3, positive=True, rows=256)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        port = client.app.state.dimse_port  # type: ignore[attr-defined]
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDINFER")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(encoded)))
        finally:
            assoc.release()
        assert status.Status == 0xA700

        response = stow(client, key, encoded)
        assert response.status_code == 409
        failed = pydicom.Dataset.from_json(response.json()).FailedSOPSequence
        assert [int(item.FailureReason) for item in failed] == [0xA700]
    assert not list((settings.data_dir / "spool").glob("*.dcm"))


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    time.sleep(0.1)
    leaked = [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
    assert not leaked, leaked


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs: writes past its end fail in the kernel with ENOSPC. Mounting needs
    root with CAP_SYS_ADMIN, which ``make test`` has on the development and CI machines."""
    mountpoint = tmp_path / "small-fs"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mounted.returncode == 0, f"cannot mount a tmpfs for the disk-full test: {mounted.stderr}"
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_spool_on_a_filesystem_that_fills_up_refuses_and_recovers_when_space_returns(
    tmp_path: Path, migrate: Callable[[Settings], str], small_filesystem: Path
) -> None:
    # No free-space floor: the kernel's ENOSPC itself must turn into 0xA700, never into Success.
    settings = _settings(
        tmp_path,
        dimse_enabled=True,
        dimse_port=0,
        dicom_spool_dir=small_filesystem / "spool",
        dicom_spool_min_free_bytes=0,
        study_settle_s=3600,
    )
    key = migrate(settings)
    encoded = study_bytes(seed=4, positive=True, rows=256)
    filler = small_filesystem / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_filesystem).free - len(encoded) // 2))
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage, "1.2.840.10008.1.2.1")

        def c_store() -> int:
            assoc = ae.associate("127.0.0.1", client.app.state.dimse_port, ae_title="MEDINFER")  # type: ignore[attr-defined]
            assert assoc.is_established
            try:
                return int(assoc.send_c_store(pydicom.dcmread(io.BytesIO(encoded))).Status)
            finally:
                assoc.release()

        assert c_store() == 0xA700
        response = stow(client, key, encoded)
        assert response.status_code == 409
        failed = pydicom.Dataset.from_json(response.json()).FailedSOPSequence
        assert [int(item.FailureReason) for item in failed] == [0xA700]
        assert sorted(p.name for p in (small_filesystem / "spool").iterdir()) == []  # no partial file left

        filler.unlink()
        assert c_store() == 0x0000
        assert len(list((small_filesystem / "spool").glob("*.dcm"))) == 1


def test_without_a_routing_rule_no_model_takes_a_study_even_one_its_allow_lists_fit(
    tmp_path: Path, migrate: Callable[[Settings], str]
) -> None:
    """The model's own allow-lists (CR/DX chest) never route by themselves: the site enables it."""
    settings = _settings(tmp_path, imaging_routes=None, dimse_enabled=True, dimse_port=0)
    key = migrate(settings)
    encoded = study_bytes(seed=3, positive=True, rows=256)  # exactly what cxr-pneumonia is intended for
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        response = stow(client, key, encoded)
        assert response.status_code == 409
        failed = pydicom.Dataset.from_json(response.json()).FailedSOPSequence
        assert [int(item.FailureReason) for item in failed] == [0x0122]
        status = c_store(client.app.state.dimse_port, encoded, calling_ae="MODALITY")  # type: ignore[attr-defined]
        assert status.Status == 0xC215
        assert status.ErrorComment == "no-route"
    assert _outbox(settings) == []
    assert not list((settings.data_dir / "spool").glob("*.dcm"))


EXPLAIN_ROUTE = '[{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": "cxr-pneumonia", "explain": true}]'


def test_an_explaining_route_delivers_the_saliency_map_before_the_sr_that_references_it(
    tmp_path: Path, migrate: Callable[[Settings], str]
) -> None:
    port = free_port()
    settings = _settings(
        tmp_path,
        study_settle_s=0.2,
        imaging_routes=EXPLAIN_ROUTE,
        pacs_destination=f"dimse://TESTPACS@127.0.0.1:{port}",
        pacs_retry_base_s=0.2,
    )
    key = migrate(settings)
    pacs = CountingPacs()
    scp = StoreScp(ScpConfig("TESTPACS", "127.0.0.1", port, (), 4), pacs)
    scp.start()
    try:
        with TestClient(create_app(settings)) as client:
            wait_ready(client)
            image = study_bytes(seed=1, positive=True, rows=512)
            assert stow(client, key, image).status_code == 200
            until(lambda: [state for _, state, _ in _outbox(settings)] == ["delivered", "delivered"])
    finally:
        scp.stop()
    seg, sr = pacs.received
    assert (seg.Modality, sr.Modality) == ("SEG", "SR")  # the map first: the SR never points at nothing
    source = pydicom.dcmread(io.BytesIO(image), stop_before_pixels=True)
    assert str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID) == str(
        source.SOPInstanceUID
    )
    evidence = {
        str(ref.ReferencedSOPInstanceUID)
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(source.SOPInstanceUID), str(seg.SOPInstanceUID)}


def test_a_route_asking_an_explanation_the_model_cannot_give_still_answers_the_study(
    tmp_path: Path, migrate: Callable[[Settings], str]
) -> None:
    settings = _settings(tmp_path, study_settle_s=0.2, imaging_routes=EXPLAIN_ROUTE)
    toml = settings.model_repository / MODEL / "model.toml"
    text = toml.read_text(encoding="utf-8")
    start = text.index("[explain]")
    end = text.index("\n[", start + 1)
    toml.write_text(text[:start] + text[end + 1 :], encoding="utf-8")  # the model declares no explanation now
    key = migrate(settings)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert stow(client, key, study_bytes(seed=1, positive=True, rows=512)).status_code == 200
        until(lambda: len(_outbox(settings)) == 1)
    assert [state for _, state, _ in _outbox(settings)] == ["held"]  # the SR alone; the study was not lost
