"""The C-STORE SCU: results (DICOM SR, SEG, secondary captures) go back to the PACS.

Blocking, one association per instance: the outbox worker calls :func:`send_cstore` from its
own thread and retries with backoff on :class:`~app.errors.DeliveryError`, so nothing here
retries or keeps state. Details name the destination and the DIMSE status, never the data.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from app.errors import DeliveryError

log = logging.getLogger(__name__)

SCHEME: Final = "dimse"
DEFAULT_CALLING_AE: Final = "MEDINFER"

#: Success, and the Storage warnings that still mean "stored" (PS3.4 B.2.3).
STORED_STATUSES: Final = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

#: Offered beside the instance's own syntax: Implicit VR Little Endian is the default every AE
#: supports (PS3.5 10.1), Explicit VR Little Endian keeps the VRs and is nearly as universal.
_FALLBACK_SYNTAXES: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_AE_TITLE_MAX: Final = 16
_JOIN_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True)
class DimseDestination:
    """A DICOM peer: its AE title and address, and the AE title we call it with."""

    called_ae: str
    host: str
    port: int
    calling_ae: str = DEFAULT_CALLING_AE

    @classmethod
    def parse(cls, url: str, calling_ae: str) -> DimseDestination:
        """Read ``dimse://CALLED_AE@host:port`` (IPv6 hosts in brackets; ``%20`` for a space).

        Raises ``ValueError`` naming what is wrong, for configuration checks at start-up.
        """
        parts = urlsplit(url)
        if parts.scheme != SCHEME:
            raise ValueError(f"a DIMSE destination must start with {SCHEME}://")
        called_ae = unquote(parts.username or "").strip()
        if not 0 < len(called_ae) <= _AE_TITLE_MAX:
            raise ValueError("a DIMSE destination needs a called AE title of 1 to 16 characters before '@'")
        if not 0 < len(calling_ae.strip()) <= _AE_TITLE_MAX:
            raise ValueError("the calling AE title must be 1 to 16 characters")
        if not parts.hostname:
            raise ValueError("a DIMSE destination needs a host")
        if parts.port is None:
            raise ValueError("a DIMSE destination needs a port")
        if parts.password is not None or parts.path not in {"", "/"} or parts.query or parts.fragment:
            raise ValueError("a DIMSE destination is only dimse://CALLED_AE@host:port")
        return cls(called_ae=called_ae, host=parts.hostname, port=parts.port, calling_ae=calling_ae.strip())

    def __str__(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"


def send_cstore(destination: DimseDestination, encoded: bytes, *, timeout_s: float = 30.0) -> None:
    """Store one DICOM Part 10 instance on ``destination``; return only once it says Success.

    The instance is offered in its own transfer syntax, and in Explicit/Implicit VR Little
    Endian as a fallback that pynetdicom converts to when the instance is uncompressed. A
    compressed instance whose syntax the PACS refuses is decompressed first, keeping its SOP
    Instance UID: the encoding changes, not the instance. Big Endian is not converted.

    Raises :class:`~app.errors.DeliveryError` when the association is refused or lost, on a
    timeout, or on any status other than Success or a Storage warning (B000, B006, B007).
    """
    dataset = _read(encoded)
    sop_class = UID(dataset.file_meta.MediaStorageSOPClassUID)
    syntax = UID(dataset.file_meta.TransferSyntaxUID)
    ae = _ae(destination, timeout_s)
    ae.add_requested_context(sop_class, syntax)
    ae.add_requested_context(sop_class, [ts for ts in _FALLBACK_SYNTAXES if ts != syntax])
    assoc = _associate(ae, destination)
    try:
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        if syntax not in accepted and syntax.is_compressed:
            _decompress(dataset, destination)
        result = assoc.send_c_store(dataset)
        status = result.get("Status")
        if status is None:
            raise DeliveryError(f"{destination} sent no C-STORE response within {timeout_s:g} s, or aborted")
        if status not in STORED_STATUSES:
            raise DeliveryError(f"{destination} answered C-STORE with status 0x{status:04X} ({_meaning(status)})")
    except ValueError as error:
        # pynetdicom: no accepted context it can use, or the data set could not be encoded in it.
        raise DeliveryError(f"{destination} accepts no transfer syntax the instance can be sent in") from error
    except RuntimeError as error:
        raise DeliveryError(f"{destination} aborted the association") from error
    finally:
        _release(assoc)
    log.info(
        "C-STORE delivered",
        extra={
            "event": "dimse.scu.stored",
            "host": destination.host,
            "port": destination.port,
            "status": f"0x{status:04X}",
        },
    )


def echo(destination: DimseDestination, *, timeout_s: float = 10.0) -> bool:
    """C-ECHO (Verification, PS3.4 A.4): ``True`` only if an association forms and the peer
    answers Success. For readiness checks, so it never raises.
    """
    ae = _ae(destination, timeout_s)
    ae.add_requested_context(Verification)
    try:
        assoc = _associate(ae, destination)
    except DeliveryError:
        return False
    try:
        result = assoc.send_c_echo()
    except (RuntimeError, ValueError):
        return False
    finally:
        _release(assoc)
    return bool(result.get("Status") == 0x0000)


def _read(encoded: bytes) -> Dataset:
    try:
        dataset = dcmread(io.BytesIO(encoded))
        _ = dataset.file_meta.MediaStorageSOPClassUID, dataset.file_meta.TransferSyntaxUID
        _ = dataset.SOPClassUID, dataset.SOPInstanceUID
    except (InvalidDicomError, AttributeError, EOFError, ValueError) as error:
        # Our own result does not parse: a bug upstream that no retry will fix; the detail says so.
        raise DeliveryError("the result to deliver is not a DICOM Part 10 instance with File Meta") from error
    return dataset


def _ae(destination: DimseDestination, timeout_s: float) -> AE:
    ae = AE(ae_title=destination.calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def _associate(ae: AE, destination: DimseDestination) -> Association:
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.called_ae)
    except OSError as error:  # the host name does not resolve
        raise DeliveryError(f"{destination} could not be resolved") from error
    if assoc.is_established:
        return assoc
    _release(assoc)
    if assoc.is_rejected:
        raise DeliveryError(f"{destination} rejected the association")
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        raise DeliveryError(f"{destination} accepts none of the presentation contexts proposed")
    raise DeliveryError(f"{destination} could not be reached, did not answer, or aborted the association")


def _decompress(dataset: Dataset, destination: DimseDestination) -> None:
    try:
        dataset.decompress(generate_instance_uid=False)
    except (RuntimeError, ValueError, NotImplementedError) as error:
        raise DeliveryError(
            f"{destination} refuses {dataset.file_meta.TransferSyntaxUID.name} and it could not be decompressed"
        ) from error


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    if assoc.is_alive():
        assoc.join(_JOIN_TIMEOUT_S)


def _meaning(status: int) -> str:
    return STORAGE_SERVICE_CLASS_STATUS.get(status, ("", "unknown status"))[1]
