"""Finding 4 (DIMSE starvation) and the imaging half of finding 8 (C-STORE receipt and SR delivery
audited), against the SCP of a real ``medinfer serve`` process over loopback.

One server serves the module: association set-up timeout 1 s, four associations, two per peer
address. Hostile peers connect from other addresses of the loopback network (127.0.0.2...), so
that each limit is met on its own; the real peers connect from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from app.transport.dimse.scp import ScpConfig, StoreScp
from tests.conftest import REPO_ROOT
from tests.integration.conftest import Served, base_env, free_port, medinfer, register_key, serve
from tests.support.imaging import closed_by_peer
from training.dicom_studies import write_phantom_study

pytestmark = pytest.mark.integration

SCP_AE = "MEDINFER"
PACS_AE = "TESTPACS"
MIB = 1024 * 1024
CXR_ROUTE = json.dumps([{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": "cxr-pneumonia"}])


@dataclass
class Pacs:
    """The PACS medinfer delivers SR to: our own SCP class, in this process, keeping what it gets."""

    received: list[bytes] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def store(self, encoded: bytes, calling_ae: str) -> None:
        self.received.append(encoded)
        self.arrived.set()


@dataclass
class Node:
    served: Served
    port: int
    env: dict[str, str]
    pacs: Pacs


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp_path = tmp_path_factory.mktemp("dimse-limits")
    pacs = Pacs()
    pacs_scp = StoreScp(ScpConfig(PACS_AE, "127.0.0.1", 0, (), 4), pacs)
    pacs_scp.start()
    port = free_port()
    env = base_env(tmp_path, REPO_ROOT / "models", None) | {
        "MEDINFER_DIMSE_ENABLED": "true",
        "MEDINFER_DIMSE_HOST": "127.0.0.1",
        "MEDINFER_DIMSE_PORT": str(port),
        "MEDINFER_DIMSE_AE_TITLE": SCP_AE,
        "MEDINFER_DIMSE_MAX_ASSOCIATIONS": "4",
        "MEDINFER_DIMSE_MAX_ASSOCIATIONS_PER_PEER": "2",
        "MEDINFER_DIMSE_ASSOCIATION_TIMEOUT_S": "1",
        "MEDINFER_DIMSE_MAX_PDU_BYTES": str(64 * 1024),
        "MEDINFER_PACS_DESTINATION": f"dimse://{PACS_AE}@127.0.0.1:{pacs_scp.port}",
        "MEDINFER_STUDY_SETTLE_S": "0.5",
        "MEDINFER_IMAGING_ROUTES": CXR_ROUTE,
    }
    assert medinfer(env, "migrate").returncode == 0
    served = serve(env, tmp_path / "medinfer.log")
    try:
        yield Node(served, port, env, pacs)
    finally:
        served.stop()
        pacs_scp.stop()


def connect_from(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def requestor(*contexts: str) -> AE:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    for context in contexts:
        ae.add_requested_context(context)
    return ae


def echo(port: int, source: str = "127.0.0.1") -> bool:
    assoc = requestor(Verification).associate("127.0.0.1", port, ae_title=SCP_AE, bind_address=(source, 0))
    if not assoc.is_established:
        return False
    try:
        return bool(assoc.send_c_echo().get("Status") == 0x0000)
    finally:
        assoc.release()


def vm_hwm(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def test_silent_connections_filling_every_slot_keep_a_real_peer_out_no_longer_than_the_set_up_timeout(
    node: Node,
) -> None:
    silent = [connect_from(node.port, source) for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3")]
    try:
        deadline = time.monotonic() + 15
        answered = False
        while not answered and time.monotonic() < deadline:
            answered = echo(node.port)
        assert answered, "four silent connections kept the SCP's slots for over 15 s"
        assert all(closed_by_peer(sock) for sock in silent)
    finally:
        for sock in silent:
            sock.close()


def test_a_512_mib_association_request_is_aborted_and_the_server_does_not_grow(node: Node) -> None:
    pid = node.served.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")  # its VmHWM := its VmRSS
    before = vm_hwm(pid)
    sent = 0
    with connect_from(node.port, "127.0.0.5") as attacker:
        attacker.settimeout(10)
        attacker.sendall(struct.pack(">BBL", 0x01, 0, 512 * MIB) + b"\x00\x01\x00\x00")
        with contextlib.suppress(OSError):
            while sent < 64 * MIB:
                attacker.sendall(bytes(MIB))
                sent += MIB
        assert closed_by_peer(attacker)
    grown = vm_hwm(pid) - before
    print(f"server VmHWM +{grown / MIB:.1f} MiB; {sent / MIB:.0f} MiB sent before the reset")
    assert sent < 64 * MIB, "the SCP read the declared body"
    assert grown < 16 * MIB
    assert echo(node.port)


#: pynetdicom 3.0.4 leaves the socket of a connection closed under it for the GC to close
#: (shutdown() raises before close(); see tests/unit/test_dimse.py).
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_third_connection_from_one_peer_is_closed_at_accept(node: Node) -> None:
    held = [connect_from(node.port, "127.0.0.6") for _ in range(2)]
    try:
        assert not echo(node.port, source="127.0.0.6")
        gc.collect()  # the refused requestor's socket warns now, under this test's filter
        assert echo(node.port, source="127.0.0.7")
    finally:
        for sock in held:
            sock.close()
    refused = [
        record
        for record in map(_json, node.served.log_lines())
        if record.get("event") == "dimse.connection.refused" and record.get("reason") == "peer-limit"
    ]
    assert refused


def test_an_association_to_another_called_ae_title_is_rejected(node: Node) -> None:
    assoc = requestor(Verification).associate("127.0.0.1", node.port, ae_title="WRONG")
    assert assoc.is_rejected
    assert echo(node.port)


def _json(line: str) -> dict[str, object]:
    with contextlib.suppress(ValueError):
        parsed = json.loads(line)
        if isinstance(parsed, dict):
            return parsed
    return {}


def _cstore(port: int, dataset: Dataset) -> int:
    ae = requestor()
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        status: int = assoc.send_c_store(dataset).Status
        return status
    finally:
        assoc.release()


def test_c_store_receipts_and_the_sr_delivery_are_audited_and_the_chain_verifies(node: Node) -> None:
    buffer = io.BytesIO()
    write_phantom_study(buffer, seed=7, positive=True, modality="CR")
    accepted = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    ct_small = get_testdata_file("CT_small.dcm", download=False)
    assert isinstance(ct_small, str)
    refused = pydicom.dcmread(ct_small)  # no routing rule for CT

    assert _cstore(node.port, accepted) == 0x0000
    assert _cstore(node.port, refused) == 0xC215
    assert node.pacs.arrived.wait(60), "no SR reached the PACS"

    key = register_key(node.env, "auditor", "audit:read")
    headers = {"Authorization": f"Bearer {key}"}
    base = node.served.base_url

    def events(action: str) -> list[dict[str, object]]:
        deadline = time.monotonic() + 15
        while True:
            page = httpx.get(f"{base}/v1/audit/events", params={"action": action}, headers=headers, timeout=10)
            assert page.status_code == 200, page.text
            found: list[dict[str, object]] = page.json()["events"]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    receipts = events("dicom.store")
    by_outcome = {str(event["outcome"]): event for event in receipts}
    assert set(by_outcome) == {"success", "failure"}
    success, failure = by_outcome["success"], by_outcome["failure"]
    assert success["actor"] == "dimse:MODALITY"
    assert _ours(success) == {"transport": "dimse", "sop_class": str(accepted.SOPClassUID)}
    assert len(_detail(success)["sop_pseudonyms"]) == 1  # type: ignore[arg-type]
    assert success["model"] == "cxr-pneumonia"
    assert success["study_pseudonym"] not in {None, str(accepted.StudyInstanceUID)}
    assert _ours(failure) == {"transport": "dimse", "sop_class": str(refused.SOPClassUID), "code": "no-route"}

    deliveries = events("pacs.delivery")
    assert [(d["outcome"], d["actor"]) for d in deliveries] == [("success", "outbox")]
    assert _ours(deliveries[0]) == {"destination": f"dimse://{PACS_AE}@127.0.0.1:{_pacs_port(node)}", "attempts": 1}

    trail = json.dumps(receipts + deliveries)
    for uid in (accepted.StudyInstanceUID, accepted.SOPInstanceUID, refused.StudyInstanceUID, refused.SOPInstanceUID):
        assert str(uid) not in trail

    verified = medinfer(node.env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout.splitlines()[-1])["valid"] is True


def _detail(event: dict[str, object]) -> dict[str, object]:
    detail = event["detail"]
    assert isinstance(detail, dict)
    return detail


def _ours(event: dict[str, object]) -> dict[str, object]:
    """The detail we wrote, without the pseudonyms the writer adds."""
    return {k: v for k, v in _detail(event).items() if not k.endswith("_pseudonym") and not k.endswith("_pseudonyms")}


def _pacs_port(node: Node) -> str:
    return node.env["MEDINFER_PACS_DESTINATION"].rsplit(":", 1)[1]
