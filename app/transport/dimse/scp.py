"""The C-STORE / C-ECHO SCP: modalities and PACS routers push instances to us over DIMSE.

pynetdicom runs the server and every association in its own threads, off the event loop. The
C-STORE handler does one thing: hand the instance, still encoded as received, to an
:class:`InstanceSink`, and answer with the status its outcome maps to in
:mod:`app.transport.dimse.status`. Parsing, checking and spooling are the sink's job; when
``store`` returns, the instance is safe and only then do we answer Success (PS3.4 B.2.3).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.utils import make_target

from app.errors import ErrorKind, MedinferError
from app.transport.dimse import status as st
from app.transport.dimse.limits import LimitedAssociationServer, PduLimits

log = logging.getLogger(__name__)

#: What we accept on the wire. The sink receives the instance in the syntax it was sent in, so
#: each of these must be one that ``app.imaging`` can decode (see ``docs/imaging.md``).
TRANSFER_SYNTAXES: Final[tuple[str, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)

#: Every storage SOP class pynetdicom knows, Non-Patient Object Storage included (PS3.4 B.5, GG).
STORAGE_SOP_CLASSES: Final[tuple[str, ...]] = tuple(
    cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax is not None
)

#: ``on_event`` outcome labels. The code is the error's code, or the rejection reason.
STORED: Final = "stored"
REFUSED: Final = "refused"
FAILED: Final = "failed"
REJECTED: Final = "association_rejected"

CALLING_AE_NOT_ALLOWED: Final = "calling-ae-not-allowed"
CALLED_AE_NOT_RECOGNISED: Final = "called-ae-not-recognised"
ASSOCIATION_LIMIT: Final = "association-limit"
#: Connections closed by a limit of :mod:`app.transport.dimse.limits` are reported as
#: ``association_rejected`` too, with that module's reason (``peer-limit``, ``pdu-too-large``...).

#: How long ``stop`` waits for each aborted association's thread to end.
_JOIN_TIMEOUT_S: Final = 5.0


class InstanceSink(Protocol):
    """Where received instances go. Called in pynetdicom's association thread, so it may block."""

    def store(self, encoded: bytes, calling_ae: str) -> None:
        """Take one DICOM Part 10 instance (preamble, ``DICM`` and File Meta Information included).

        Return only once the instance is safely kept (spooled): the SCP then answers Success and
        the sender may delete its copy. Raise a :class:`~app.errors.MedinferError` to refuse it.
        """
        ...


@dataclass(frozen=True)
class ScpConfig:
    """How the SCP listens. ``port=0`` binds a free port (read it back from :attr:`StoreScp.port`).

    An association must call us by ``ae_title``; ``allowed_calling_aes`` empty means any calling
    AE title is accepted. The timeouts bound each phase so that a silent or dead peer cannot
    hold an association (and a slot) for long: ``association`` from the TCP connection to a
    complete A-ASSOCIATE-RQ (and for release), ``dimse`` for a message once started and for any
    one PDU, ``network`` for an idle association. ``max_pdu_bytes`` caps the length a PDU may
    declare (the request itself: 64 KiB). ``max_associations_per_peer`` (None: no cap of its
    own) caps connections from one address; at most twice ``max_associations`` connections
    are open at once, the excess being closed at accept.
    """

    ae_title: str
    host: str
    port: int
    allowed_calling_aes: tuple[str, ...]
    max_associations: int
    association_timeout_s: float = 5.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    max_pdu_bytes: int = 4 * 1024 * 1024
    max_associations_per_peer: int | None = None

    def __post_init__(self) -> None:
        if not 0 < len(self.ae_title.strip()) <= 16:  # noqa: PLR2004 - AE is at most 16 characters (PS3.5 6.2)
            raise ValueError("ae_title must be 1 to 16 characters")
        if not 0 <= self.port <= 65535:  # noqa: PLR2004 - the TCP port range
            raise ValueError("port must be 0 to 65535")
        if self.max_associations < 1:
            raise ValueError("max_associations must be at least 1")
        if self.max_associations_per_peer is not None and self.max_associations_per_peer < 1:
            raise ValueError("max_associations_per_peer must be at least 1")

    @property
    def pdu_limits(self) -> PduLimits:
        return PduLimits(
            association_timeout_s=self.association_timeout_s,
            max_pdu_bytes=self.max_pdu_bytes,
            pdu_timeout_s=self.dimse_timeout_s,
            network_timeout_s=self.network_timeout_s,
        )


class StoreScp:
    """A Storage SCP (all storage SOP classes) and Verification SCP, served by pynetdicom.

    ``on_event(outcome, code)`` is called once per C-STORE (``stored``, ``refused`` with the
    error code, ``failed`` for an unexpected error) and per rejected association or connection
    closed by a limit (``association_rejected`` with the reason). It feeds metrics; its own
    errors are logged and otherwise ignored.
    """

    def __init__(
        self,
        config: ScpConfig,
        sink: InstanceSink,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self._config = config
        self._sink = sink
        self._on_event = on_event
        self._lock = threading.Lock()
        self._server: LimitedAssociationServer | None = None
        self._ae = self._build_ae(config)

    @staticmethod
    def _build_ae(config: ScpConfig) -> AE:
        ae = AE(ae_title=config.ae_title)
        ae.require_calling_aet = list(config.allowed_calling_aes)
        ae.require_called_aet = True
        ae.maximum_associations = config.max_associations
        # The ACSE timeout is what ends a connection that never sends an A-ASSOCIATE-RQ (the
        # association waits this long for it, and the DUL's ARTIM timer runs as long).
        ae.acse_timeout = config.association_timeout_s
        ae.dimse_timeout = config.dimse_timeout_s
        ae.network_timeout = config.network_timeout_s
        # The 128-context limit binds requestors only; an acceptor may support them all.
        ae.add_supported_context(Verification, list(TRANSFER_SYNTAXES))
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        """Bind and serve in pynetdicom's threads; returns at once. A no-op if already serving."""
        with self._lock:
            if self._server is not None:
                return
            config = self._config
            # AE.start_server(block=False), with our server class: served from a daemon thread,
            # and known to the AE (its shutdown() removes it from there).
            server = LimitedAssociationServer(
                self._ae,
                (config.host, config.port),
                limits=config.pdu_limits,
                max_per_peer=config.max_associations_per_peer or 2 * config.max_associations,
                max_connections=2 * config.max_associations,
                on_reject=self._on_limit,
                evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)],
            )
            thread = threading.Thread(
                target=make_target(server.serve_forever), name="AcceptorServer@medinfer", daemon=True
            )
            thread.start()
            self._ae._servers.append(server)  # as start_server does; shutdown() removes it
            self._server = server
        log.info(
            "DIMSE SCP listening",
            extra={"event": "dimse.scp.started", "host": self._config.host, "port": self.port},
        )

    @property
    def port(self) -> int:
        """The bound TCP port: the configured one, or the one the OS picked for ``port=0``."""
        server = self._server
        if server is None:
            raise RuntimeError("the SCP is not started")
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop accepting, abort open associations and free the port. Safe to call repeatedly.

        An aborted sender gets no status for an instance in flight, so it keeps and resends it.
        """
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        associations = server.active_associations
        for association in associations:
            association.abort()
        for association in associations:
            association.join(_JOIN_TIMEOUT_S)
        log.info("DIMSE SCP stopped", extra={"event": "dimse.scp.stopped", "count": len(associations)})

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """EVT_C_STORE: Success only once the sink has the instance; a failure status otherwise.

        Nothing may escape: pynetdicom would answer 0xC211 itself, but log the exception with
        its message, which may quote the data set.
        """
        try:
            encoded = event.encoded_dataset(include_meta=True)
            self._sink.store(encoded, event.assoc.requestor.ae_title)
        except MedinferError as error:
            code = st.cstore_status(error)
            log.log(
                logging.ERROR if error.kind is ErrorKind.INTERNAL else logging.INFO,
                "C-STORE refused",
                extra={"event": "dimse.store.refused", "code": error.code, "status": f"0x{code:04X}"},
            )
            self._emit(REFUSED, error.code)
            return _failure(code, st.error_comment(error))
        except Exception as error:  # noqa: BLE001 - every error must become a status, never escape
            # The class name only: the message and traceback locals may hold patient data.
            log.error(  # noqa: TRY400 - exc_info would print the message in plain-text logs
                "C-STORE failed unexpectedly",
                extra={"event": "dimse.store.failed", "exc_type": type(error).__name__},
            )
            self._emit(FAILED, st.UNEXPECTED_COMMENT)
            return _failure(st.UNEXPECTED, st.error_comment(error))
        self._emit(STORED, "")
        return st.SUCCESS

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom says only "rejected"; of the three checks we configure, find which one failed.
        allowed = {title.strip() for title in self._config.allowed_calling_aes}
        calling = event.assoc.requestor.ae_title
        request = event.assoc.requestor.primitive
        called = str(getattr(request, "called_ae_title", "")).strip()
        if allowed and calling not in allowed:
            reason = CALLING_AE_NOT_ALLOWED
        elif called != self._config.ae_title.strip():
            reason = CALLED_AE_NOT_RECOGNISED
        else:
            reason = ASSOCIATION_LIMIT
        log.warning("DIMSE association rejected", extra={"event": "dimse.association.rejected", "reason": reason})
        self._emit(REJECTED, reason)

    def _on_limit(self, reason: str) -> None:
        self._emit(REJECTED, reason)

    def _emit(self, outcome: str, code: str) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(outcome, code)
        except Exception as error:  # noqa: BLE001 - a metrics hook must not fail a C-STORE
            log.error("DIMSE event hook failed", extra={"event": "dimse.hook.failed", "exc_type": type(error).__name__})  # noqa: TRY400


def _failure(status: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment
    return rsp
