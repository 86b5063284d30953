"""DIMSE transport: the SCP against real dcmtk and pynetdicom peers, the SCU against the SCP and
a minimal pynetdicom PACS, and the C-STORE status table. Loopback only, ports picked by the OS.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    MRImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.status import STATUS_FAILURE, STORAGE_SERVICE_CLASS_STATUS

from app import errors as e
from app.transport.dimse import status as st
from app.transport.dimse.limits import ASSOCIATION_TIMEOUT, PDU_TOO_LARGE, PEER_LIMIT
from app.transport.dimse.scp import (
    ASSOCIATION_LIMIT,
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_ALLOWED,
    FAILED,
    REFUSED,
    REJECTED,
    STORED,
    ScpConfig,
    StoreScp,
)
from app.transport.dimse.scu import DimseDestination, echo, send_cstore
from tests.support.dcmtk import dcmtk
from tests.support.imaging import closed_by_peer

SCP_AE = "MEDINFER"
MODALITY_AE = "MODALITY"
PHI_MARKER = "DOE^JOHN 1234567"

#: pynetdicom 3.0.4 drops, unclosed, the socket of a refused TCP connect (it calls shutdown()
#: before close() in one try, and shutdown() of an unconnected socket raises); CPython closes it
#: at once but warns. Upstream pydicom/pynetdicom#999 (for #979) adds the missing close.
pynetdicom_979 = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")


def sample(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in pydicom-data"
    return Path(path)


@dataclass
class RecordingSink:
    """Spools to ``tmp_path`` like the real sink would; raises ``refuse_with`` instead when set."""

    directory: Path
    refuse_with: BaseException | None = None
    stored: list[tuple[Path, str]] = field(default_factory=list)

    def store(self, encoded: bytes, calling_ae: str) -> None:
        if self.refuse_with is not None:
            raise self.refuse_with
        path = self.directory / f"{len(self.stored)}.dcm"
        path.write_bytes(encoded)
        self.stored.append((path, calling_ae))


@dataclass
class EventLog:
    events: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, outcome: str, code: str) -> None:
        self.events.append((outcome, code))


@dataclass
class Relay:
    """Lets one SCP serve a module's tests, each with its own sink and event log.

    Stopping an SCP takes up to half a second (socketserver's poll interval), so tests that
    need no special configuration share one.
    """

    sink: RecordingSink | None = None
    log: EventLog = field(default_factory=EventLog)

    def store(self, encoded: bytes, calling_ae: str) -> None:
        assert self.sink is not None, "C-STORE outside a test"
        self.sink.store(encoded, calling_ae)


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while (leaked := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not leaked, f"threads left running: {sorted(t.name for t in leaked)}"


@pytest.fixture
def sink(tmp_path: Path) -> RecordingSink:
    return RecordingSink(tmp_path)


def scp_config(
    allowed: tuple[str, ...] = (),
    max_associations: int = 4,
    *,
    association_timeout_s: float = 5,
    max_pdu_bytes: int = 4 * 1024 * 1024,
    max_associations_per_peer: int | None = None,
) -> ScpConfig:
    return ScpConfig(
        ae_title=SCP_AE,
        host="127.0.0.1",
        port=0,
        allowed_calling_aes=allowed,
        max_associations=max_associations,
        association_timeout_s=association_timeout_s,
        dimse_timeout_s=5,
        network_timeout_s=5,
        max_pdu_bytes=max_pdu_bytes,
        max_associations_per_peer=max_associations_per_peer,
    )


ScpFactory = Callable[..., StoreScp]


@pytest.fixture
def start_scp(sink: RecordingSink) -> Iterator[ScpFactory]:
    """An SCP of the test's own, for configurations the shared one lacks."""
    started: list[StoreScp] = []

    def start(
        *,
        allowed: tuple[str, ...] = (),
        max_associations: int = 4,
        on_event: Callable[[str, str], None] | None = None,
        association_timeout_s: float = 5,
        max_pdu_bytes: int = 4 * 1024 * 1024,
        max_associations_per_peer: int | None = None,
    ) -> StoreScp:
        config = scp_config(
            allowed,
            max_associations,
            association_timeout_s=association_timeout_s,
            max_pdu_bytes=max_pdu_bytes,
            max_associations_per_peer=max_associations_per_peer,
        )
        scp = StoreScp(config, sink, on_event)
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture(scope="module")
def shared_scp() -> Iterator[tuple[StoreScp, Relay]]:
    relay = Relay()
    scp = StoreScp(scp_config(), relay, relay.log)
    scp.start()
    yield scp, relay
    scp.stop()


@pytest.fixture
def scp(shared_scp: tuple[StoreScp, Relay], sink: RecordingSink) -> Iterator[StoreScp]:
    """The shared SCP, storing into this test's ``sink``; no calling-AE list, four associations."""
    scp, relay = shared_scp
    relay.sink = sink
    relay.log.events.clear()
    yield scp
    relay.sink = None


@pytest.fixture
def events(shared_scp: tuple[StoreScp, Relay]) -> EventLog:
    """What the shared SCP reported to its ``on_event`` hook during this test."""
    return shared_scp[1].log


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def associate(port: int, dataset: Dataset, calling_ae: str = MODALITY_AE) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    return ae.associate("127.0.0.1", port, ae_title=SCP_AE)


def cstore(port: int, path: Path, calling_ae: str = MODALITY_AE) -> Dataset:
    """C-STORE with pynetdicom as the SCU; the response's status data set."""
    dataset = dcmread(path)
    assoc = associate(port, dataset, calling_ae)
    assert assoc.is_established
    try:
        return assoc.send_c_store(dataset)
    finally:
        assoc.release()


def storescu(port: int, path: Path, *flags: str, calling_ae: str = MODALITY_AE) -> subprocess.CompletedProcess[str]:
    command = [dcmtk("storescu"), "-ta", "5", "-td", "5", "-ts", "5", "-aet", calling_ae, "-aec", SCP_AE, *flags]
    return subprocess.run(
        [*command, "127.0.0.1", str(port), str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def assert_same_instance(received: Path, sent: Path) -> None:
    got, want = dcmread(received), dcmread(sent)
    assert got.SOPInstanceUID == want.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == want.file_meta.TransferSyntaxUID
    assert got.PixelData == want.PixelData


# The status table


def instance(cls: type[e.MedinferError]) -> e.MedinferError:
    return e.DecryptionError("x", reason="test") if cls is e.DecryptionError else cls("x")


def test_every_error_maps_to_a_storage_failure_status() -> None:
    for cls in e.ALL_ERRORS:
        status = st.cstore_status(instance(cls))
        assert STORAGE_SERVICE_CLASS_STATUS[status][0] == STATUS_FAILURE, cls


def test_each_dicom_refusal_has_its_own_status() -> None:
    statuses = [
        st.STATUS_BY_ERROR[cls] for cls in st.STATUS_BY_ERROR if st.STATUS_BY_ERROR[cls] >= st.CANNOT_UNDERSTAND
    ]
    assert len(statuses) == len(set(statuses))
    assert st.UNEXPECTED not in statuses


def test_cannot_take_it_now_is_out_of_resources() -> None:
    for cls in (e.OutOfResourcesError, e.OverloadedError, e.AuditUnavailableError, e.DatabaseUnavailableError):
        assert st.cstore_status(cls("x")) & 0xFF00 == 0xA700, cls
    # Too large is permanent: a sender that retries 0xA7xx must not resend it for ever.
    assert st.cstore_status(e.DicomTooLargeError("x")) & 0xF000 == 0xC000


def test_unlisted_errors_fall_back_to_their_kind_and_subclasses_inherit() -> None:
    class SpoolQuotaError(e.OutOfResourcesError):
        code = "spool-quota"

    assert st.cstore_status(SpoolQuotaError("x")) == st.OUT_OF_RESOURCES
    assert st.cstore_status(e.ModelNotFoundError("x")) == st.CANNOT_UNDERSTAND
    assert st.cstore_status(e.PermissionDeniedError("x")) == st.NOT_AUTHORISED
    assert st.cstore_status(e.MedinferError("x")) == st.UNEXPECTED


def test_unexpected_exceptions_are_0xc211_and_the_comment_never_carries_the_message() -> None:
    assert st.cstore_status(KeyError(PHI_MARKER)) == 0xC211
    assert st.error_comment(KeyError(PHI_MARKER)) == "internal-error"
    assert st.error_comment(e.DicomMalformedError(PHI_MARKER)) == "dicom-malformed"
    assert all(len(st.error_comment(instance(cls))) <= 64 for cls in e.ALL_ERRORS)


# C-ECHO


def test_dcmtk_echoscu_is_answered(scp: StoreScp) -> None:
    done = subprocess.run(
        [dcmtk("echoscu"), "-ta", "5", "-aet", MODALITY_AE, "-aec", SCP_AE, "127.0.0.1", str(scp.port)],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def test_pynetdicom_echo_is_answered(scp: StoreScp) -> None:
    assert echo(DimseDestination(SCP_AE, "127.0.0.1", scp.port), timeout_s=5)


@pynetdicom_979
def test_echo_to_a_closed_port_is_false_not_an_error() -> None:
    assert not echo(DimseDestination(SCP_AE, "127.0.0.1", free_port()), timeout_s=5)


# C-STORE from dcmtk


def test_storescu_instance_reaches_the_sink_unchanged(scp: StoreScp, sink: RecordingSink) -> None:
    sent = sample("RG1_UNCR.dcm")
    done = storescu(scp.port, sent)
    assert done.returncode == 0, done.stderr
    [(received, calling_ae)] = sink.stored
    assert calling_ae == MODALITY_AE
    assert_same_instance(received, sent)
    assert received.read_bytes()[128:132] == b"DICM"


@pytest.mark.parametrize(
    ("name", "propose"),
    [
        ("RG1_J2KR.dcm", "--propose-j2k-lossless"),
        ("JPEG2000.dcm", "--propose-j2k-lossy"),
        ("MR_small_RLE.dcm", "--propose-rle"),
        ("SC_rgb_jpeg_dcmtk.dcm", "--propose-jpeg8"),
        ("JPEG-lossy.dcm", "--propose-jpeg12"),
        ("JPEG-LL.dcm", "--propose-lossless"),
        ("MR_small_jpeg_ls_lossless.dcm", "--propose-jls-lossless"),
        ("image_dfl.dcm", "--propose-deflated"),
        ("MR_small_bigendian.dcm", "--propose-big"),
        ("MR_small_implicit.dcm", "--propose-implicit"),
    ],
)
def test_storescu_sends_each_accepted_transfer_syntax_as_is(
    scp: StoreScp, sink: RecordingSink, name: str, propose: str
) -> None:
    sent = sample(name)
    done = storescu(scp.port, sent, propose)
    assert done.returncode == 0, done.stderr
    [(received, _)] = sink.stored
    assert_same_instance(received, sent)


# Refusals


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (e.OutOfResourcesError("spool full"), 0xA700),
        (e.OverloadedError("queue full"), 0xA701),
        (e.AuditUnavailableError("audit down"), 0xA702),
        (e.DatabaseUnavailableError("db down"), 0xA702),
        (e.DicomMalformedError("truncated"), 0xC210),
        (e.DicomUnsupportedError("transfer syntax"), 0xC212),
        (e.DicomTooLargeError("pixels"), 0xC213),
        (e.DicomNotAcceptedError("Modality"), 0xC214),
        (e.NoRouteError("no rule"), 0xC215),
        (e.StudyMismatchError("study"), 0xC216),
        (e.ModelNotFoundError("model"), 0xC000),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else f"0x{value:04X}",
)
def test_refusal_is_answered_with_its_status_and_code(
    scp: StoreScp, sink: RecordingSink, events: EventLog, error: e.MedinferError, status: int
) -> None:
    sink.refuse_with = error
    rsp = cstore(scp.port, sample("CT_small.dcm"))
    assert rsp.Status == status
    assert rsp.ErrorComment == error.code
    assert events.events == [(REFUSED, error.code)]
    assert not sink.stored


def test_unexpected_error_is_0xc211_without_detail_and_the_server_keeps_serving(
    scp: StoreScp, sink: RecordingSink, events: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    sink.refuse_with = KeyError(PHI_MARKER)
    with caplog.at_level(logging.DEBUG):
        rsp = cstore(scp.port, sample("CT_small.dcm"))
    assert rsp.Status == 0xC211
    assert rsp.ErrorComment == "internal-error"
    assert PHI_MARKER not in caplog.text
    assert any(getattr(r, "exc_type", None) == "KeyError" for r in caplog.records)

    sink.refuse_with = None
    assert cstore(scp.port, sample("CT_small.dcm")).Status == 0x0000
    assert events.events == [(FAILED, "internal-error"), (STORED, "")]
    assert len(sink.stored) == 1


def test_a_failing_event_hook_does_not_fail_the_store(start_scp: ScpFactory, sink: RecordingSink) -> None:
    def broken_hook(outcome: str, code: str) -> None:
        raise RuntimeError(outcome + code)

    scp = start_scp(on_event=broken_hook)
    assert cstore(scp.port, sample("CT_small.dcm")).Status == 0x0000
    assert len(sink.stored) == 1


# Associations


def test_calling_ae_outside_the_allow_list_is_rejected(start_scp: ScpFactory, sink: RecordingSink) -> None:
    events = EventLog()
    scp = start_scp(allowed=(MODALITY_AE,), on_event=events)
    sent = sample("CT_small.dcm")

    assert storescu(scp.port, sent, calling_ae="INTRUDER").returncode != 0
    assoc = associate(scp.port, dcmread(sent), calling_ae="INTRUDER")
    assert assoc.is_rejected
    assert not sink.stored
    assert events.events == [(REJECTED, CALLING_AE_NOT_ALLOWED)] * 2

    done = storescu(scp.port, sent, calling_ae=MODALITY_AE)
    assert done.returncode == 0, done.stderr
    assert [calling_ae for _, calling_ae in sink.stored] == [MODALITY_AE]


def test_associations_beyond_the_limit_are_rejected(start_scp: ScpFactory) -> None:
    events = EventLog()
    scp = start_scp(max_associations=1, on_event=events)
    dataset = dcmread(sample("CT_small.dcm"))
    first = associate(scp.port, dataset)
    try:
        assert first.is_established
        second = associate(scp.port, dataset)
        assert second.is_rejected
    finally:
        first.release()
    assert events.events == [(REJECTED, ASSOCIATION_LIMIT)]


@pynetdicom_979
def test_stop_is_idempotent_aborts_open_associations_and_frees_the_port(start_scp: ScpFactory) -> None:
    scp = start_scp()
    port = scp.port
    held = associate(port, dcmread(sample("CT_small.dcm")))
    assert held.is_established
    scp.stop()
    scp.stop()
    held.join(5)
    assert held.is_aborted
    with socket.socket() as rebind:
        rebind.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rebind.bind(("127.0.0.1", port))
    assert not echo(DimseDestination(SCP_AE, "127.0.0.1", port), timeout_s=2)
    with pytest.raises(RuntimeError, match="not started"):
        _ = scp.port


def test_config_refuses_impossible_values() -> None:
    with pytest.raises(ValueError, match="ae_title"):
        ScpConfig("A" * 17, "127.0.0.1", 0, (), 1)
    with pytest.raises(ValueError, match="max_associations"):
        ScpConfig(SCP_AE, "127.0.0.1", 0, (), 0)
    with pytest.raises(ValueError, match="port"):
        ScpConfig(SCP_AE, "127.0.0.1", 70000, (), 1)


# Limits: what a peer may cost before and after it associates (security round 2, finding 4)

MIB = 1024 * 1024


def pdu_header(pdu_type: int, length: int) -> bytes:
    """A PDU's 6 bytes (PS3.8 9.3.1): type, reserved, big-endian length."""
    return struct.pack(">BBL", pdu_type, 0, length)


def vm_hwm() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    status = Path("/proc/self/status").read_text(encoding="ascii")
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def connect_from(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def test_an_association_to_another_called_ae_title_is_rejected(scp: StoreScp, events: EventLog) -> None:
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="WRONG")
    assert assoc.is_rejected
    assert events.events == [(REJECTED, CALLED_AE_NOT_RECOGNISED)]
    assert echo(DimseDestination(SCP_AE, "127.0.0.1", scp.port), timeout_s=5)


def test_a_connection_stalled_inside_its_association_request_is_closed_after_the_set_up_timeout(
    start_scp: ScpFactory,
) -> None:
    events = EventLog()
    scp = start_scp(association_timeout_s=1, on_event=events)
    with connect_from(scp.port) as stalled:
        stalled.sendall(pdu_header(0x01, 200)[:3])  # half a header, then nothing
        assert closed_by_peer(stalled)
    assert (REJECTED, ASSOCIATION_TIMEOUT) in events.events


def test_silent_connections_give_their_slots_back_after_the_set_up_timeout(start_scp: ScpFactory) -> None:
    scp = start_scp(max_associations=2, association_timeout_s=1)
    destination = DimseDestination(SCP_AE, "127.0.0.1", scp.port)
    silent = [connect_from(scp.port) for _ in range(2)]
    try:
        deadline = time.monotonic() + 15
        answered = False
        while not answered and time.monotonic() < deadline:
            answered = echo(destination, timeout_s=5)
        assert answered
        assert all(closed_by_peer(sock) for sock in silent)
    finally:
        for sock in silent:
            sock.close()


def test_an_association_request_declaring_512_mib_is_aborted_before_its_body_is_read(start_scp: ScpFactory) -> None:
    events = EventLog()
    scp = start_scp(association_timeout_s=2, on_event=events)
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # VmHWM := VmRSS
    before = vm_hwm()
    sent = 0
    with connect_from(scp.port) as attacker:
        attacker.settimeout(10)
        attacker.sendall(pdu_header(0x01, 512 * MIB) + b"\x00\x01\x00\x00")
        chunk = bytes(MIB)
        with contextlib.suppress(OSError):
            while sent < 64 * MIB:
                attacker.sendall(chunk)
                sent += len(chunk)
        assert closed_by_peer(attacker)
    grown = vm_hwm() - before
    print(f"512 MiB A-ASSOCIATE-RQ: {sent / MIB:.0f} MiB sent before the reset, VmHWM +{grown / MIB:.1f} MiB")
    assert sent < 64 * MIB, "the SCP read the declared body"
    assert grown < 16 * MIB
    assert (REJECTED, PDU_TOO_LARGE) in events.events


@pynetdicom_979  # the requestor's socket, reset by the abort, is left for the GC to close
def test_a_pdu_longer_than_the_cap_aborts_an_established_association(start_scp: ScpFactory) -> None:
    events = EventLog()
    scp = start_scp(association_timeout_s=2, max_pdu_bytes=64 * 1024, on_event=events)
    assoc = associate(scp.port, dcmread(sample("CT_small.dcm")))
    assert assoc.is_established
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert raw is not None
    raw.sendall(pdu_header(0x04, MIB) + bytes(16))  # a P-DATA-TF declaring 1 MiB, body withheld
    assoc.join(15)
    assert assoc.is_aborted
    assert (REJECTED, PDU_TOO_LARGE) in events.events


@pynetdicom_979  # the refused requestor's socket is left for the GC to close
def test_connections_beyond_the_per_peer_limit_are_closed_at_accept_and_other_peers_still_associate(
    start_scp: ScpFactory,
) -> None:
    events = EventLog()
    scp = start_scp(max_associations=4, max_associations_per_peer=2, association_timeout_s=2, on_event=events)
    held = [connect_from(scp.port) for _ in range(2)]
    try:
        dataset = dcmread(sample("CT_small.dcm"))
        third = associate(scp.port, dataset)
        assert not third.is_established
        assert (REJECTED, PEER_LIMIT) in events.events
        del third
        gc.collect()  # its unclosed socket warns now, under this test's filter
        ae = AE(ae_title=MODALITY_AE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(Verification)
        other = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AE, bind_address=("127.0.0.2", 0))
        assert other.is_established
        assert other.send_c_echo().Status == 0x0000
        other.release()
    finally:
        for sock in held:
            sock.close()


# The SCU


def test_destination_is_parsed_from_a_dimse_url() -> None:
    assert DimseDestination.parse("dimse://ORTHANC@127.0.0.1:4242", "MEDINFER") == DimseDestination(
        "ORTHANC", "127.0.0.1", 4242, "MEDINFER"
    )
    assert DimseDestination.parse("dimse://MY%20PACS@[::1]:104", "AI") == DimseDestination("MY PACS", "::1", 104, "AI")


@pytest.mark.parametrize(
    "url",
    [
        "http://ORTHANC@127.0.0.1:4242",
        "dimse://127.0.0.1:4242",
        "dimse://ORTHANC@127.0.0.1",
        "dimse://ABCDEFGHIJKLMNOPQ@127.0.0.1:4242",
        "dimse://ORTHANC:secret@127.0.0.1:4242",
        "dimse://ORTHANC@127.0.0.1:4242/path",
    ],
)
def test_malformed_destination_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="DIMSE destination"):
        DimseDestination.parse(url, "MEDINFER")


def test_send_cstore_to_the_scp_delivers_the_instance(scp: StoreScp, sink: RecordingSink) -> None:
    sent = sample("MR_small_RLE.dcm")
    send_cstore(DimseDestination(SCP_AE, "127.0.0.1", scp.port, "RESULTS"), sent.read_bytes(), timeout_s=5)
    [(received, calling_ae)] = sink.stored
    assert calling_ae == "RESULTS"
    assert_same_instance(received, sent)


@pynetdicom_979
def test_send_cstore_to_a_closed_port_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(e.DeliveryError, match="could not be reached"):
        send_cstore(DimseDestination("PACS", "127.0.0.1", free_port()), sample("CT_small.dcm").read_bytes())
    assert time.monotonic() - started < 5


def test_send_cstore_to_a_silent_peer_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        started = time.monotonic()
        with pytest.raises(e.DeliveryError):
            send_cstore(
                DimseDestination("PACS", "127.0.0.1", silent.getsockname()[1]),
                sample("CT_small.dcm").read_bytes(),
                timeout_s=0.5,
            )
        assert time.monotonic() - started < 5


def test_send_cstore_refused_by_the_scp_names_the_status(scp: StoreScp, sink: RecordingSink) -> None:
    sink.refuse_with = e.OutOfResourcesError("spool full")
    with pytest.raises(e.DeliveryError, match=r"0xA700 \(Refused: Out of Resources\)"):
        send_cstore(DimseDestination(SCP_AE, "127.0.0.1", scp.port), sample("CT_small.dcm").read_bytes())


def test_send_cstore_rejected_association_is_a_delivery_error(start_scp: ScpFactory) -> None:
    scp = start_scp(allowed=(MODALITY_AE,))
    with pytest.raises(e.DeliveryError, match="rejected the association"):
        send_cstore(DimseDestination(SCP_AE, "127.0.0.1", scp.port, "INTRUDER"), sample("CT_small.dcm").read_bytes())


def test_send_cstore_of_bytes_that_are_not_dicom_is_a_delivery_error() -> None:
    with pytest.raises(e.DeliveryError, match="not a DICOM Part 10 instance"):
        send_cstore(DimseDestination("PACS", "127.0.0.1", free_port()), b"not dicom")


@pytest.fixture(scope="module")
def plain_pacs_server() -> Iterator[tuple[int, list[bytes]]]:
    """A PACS that takes MR and Secondary Capture in Explicit VR Little Endian only."""
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        yield int(server.server_address[1]), received
    finally:
        ae.shutdown()


@pytest.fixture
def plain_pacs(plain_pacs_server: tuple[int, list[bytes]]) -> tuple[int, list[bytes]]:
    plain_pacs_server[1].clear()
    return plain_pacs_server


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm", "image_dfl.dcm"])
def test_send_cstore_falls_back_to_explicit_little_endian(plain_pacs: tuple[int, list[bytes]], name: str) -> None:
    port, received = plain_pacs
    sent = sample(name)
    send_cstore(DimseDestination("PACS", "127.0.0.1", port), sent.read_bytes(), timeout_s=5)
    [encoded] = received
    got, want = dcmread(io.BytesIO(encoded)), dcmread(sent)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got.SOPInstanceUID == want.SOPInstanceUID
    assert (got.pixel_array == want.pixel_array).all()


def test_send_cstore_of_a_sop_class_the_pacs_lacks_names_the_cause(plain_pacs: tuple[int, list[bytes]]) -> None:
    port, received = plain_pacs
    with pytest.raises(e.DeliveryError, match="accepts none of the presentation contexts"):
        send_cstore(DimseDestination("PACS", "127.0.0.1", port), sample("CT_small.dcm").read_bytes(), timeout_s=5)
    assert not received


def test_a_route_to_an_unacknowledged_demo_model_is_a_permanent_refusal_of_its_own() -> None:
    status = st.cstore_status(e.ModelNotAcknowledgedError("x"))
    assert status == st.MODEL_NOT_ACKNOWLEDGED
    assert status & 0xF000 == 0xC000  # not 0xA7xx: a PACS must not resend it for ever
    assert st.error_comment(e.ModelNotAcknowledgedError("x")) == "model-not-acknowledged"
