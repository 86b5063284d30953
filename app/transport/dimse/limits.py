"""Limits on what a DICOM peer may cost the SCP before and after it associates.

pynetdicom trusts the wire: an accepted connection is read with no timeout at all (the socket
returned by ``accept`` blocks), and a PDU is read in full, whatever length its header declares,
before anything looks at it (``DULServiceProvider._read_pdu_data``). A peer that says nothing
holds an association slot until the ACSE timeout; one that sends a few bytes of a header holds
it for ever; one that declares a 512 MiB A-ASSOCIATE-RQ makes us buffer it.

Here the accepted socket itself keeps count of the PDU stream (PS3.8 9.3: a PDU is a 6-byte
header, type and length, then that many bytes):

* the first PDU (the A-ASSOCIATE-RQ, PS3.8 9.3.2) must arrive whole within the association
  set-up timeout of the connection being accepted, and may declare at most
  :data:`MAX_ASSOCIATE_RQ_BYTES`;
* any later PDU may declare at most ``max_pdu_bytes`` and, once begun, must arrive whole within
  ``pdu_timeout_s``.

A longer declaration or a stalled read aborts the association (A-ABORT, PS3.8 9.3.8, then the
connection is closed) *before* the body is read. The server, for its part, closes at accept a
connection from a peer address that already holds ``max_per_peer`` connections, or one beyond
``max_connections`` in all, so a single host cannot take every association slot and a flood
cannot start unbounded threads.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from pynetdicom import evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

#: An A-ASSOCIATE-RQ proposing 128 presentation contexts with a dozen transfer syntaxes each
#: stays far below this; anything longer is not a request we would accept.
MAX_ASSOCIATE_RQ_BYTES: Final = 64 * 1024
_HEADER: Final = struct.Struct(">BBL")
#: A-ABORT PDU (PS3.8 9.3.8): source 2 (service provider), reason 6 (invalid PDU parameter value).
_ABORT_PDU: Final = bytes((0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, 0x06))
_ABORT_SEND_TIMEOUT_S: Final = 1.0

#: Reasons handed to the ``on_reject`` hook (and logged); none carries anything the peer sent.
PDU_TOO_LARGE: Final = "pdu-too-large"
ASSOCIATION_TIMEOUT: Final = "association-timeout"
PDU_TIMEOUT: Final = "pdu-timeout"
PEER_LIMIT: Final = "peer-limit"
CONNECTION_LIMIT: Final = "connection-limit"


@dataclass(frozen=True, slots=True)
class PduLimits:
    """How long and how large the PDUs of one connection may be (see the module docstring).

    ``network_timeout_s`` bounds every other blocking socket call (a send to a peer that does
    not read), which pynetdicom leaves unbounded on accepted connections.
    """

    association_timeout_s: float
    max_pdu_bytes: int
    pdu_timeout_s: float
    network_timeout_s: float
    max_associate_rq_bytes: int = MAX_ASSOCIATE_RQ_BYTES

    def __post_init__(self) -> None:
        if min(self.association_timeout_s, self.pdu_timeout_s, self.network_timeout_s) <= 0:
            raise ValueError("DIMSE timeouts must be positive")
        if self.max_pdu_bytes < 1 or self.max_associate_rq_bytes < 1:
            raise ValueError("PDU caps must be positive")


class PduLimitExceededError(ConnectionAbortedError):
    """Raised to pynetdicom's reader when a peer broke a limit; it treats it as a lost connection.

    The message is one of the reason constants above, never data from the peer.
    """


class GuardedSocket(socket.socket):
    """An accepted connection that reads the peer's PDUs only within :class:`PduLimits`.

    Built by :meth:`adopt` from the socket ``accept`` returned. pynetdicom asks for a header's
    6 bytes, then for the declared length, in reads of at most 4 KiB; this socket follows that
    stream, so it knows each PDU's declared length before any of its body is asked for.
    """

    _limits: PduLimits
    _on_violation: Callable[[str], None]
    _header: bytearray
    _body_left: int
    _pdus: int
    _deadline: float

    @classmethod
    def adopt(cls, sock: socket.socket, limits: PduLimits, on_violation: Callable[[str], None]) -> GuardedSocket:
        guarded = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        guarded._limits = limits
        guarded._on_violation = on_violation
        guarded._header = bytearray()
        guarded._body_left = 0
        guarded._pdus = 0
        guarded._deadline = time.monotonic() + limits.association_timeout_s
        guarded.settimeout(limits.network_timeout_s)
        return guarded

    @property
    def closed(self) -> bool:
        return self.fileno() == -1

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._pdus > 0 and not self._header and self._body_left == 0:
            self._deadline = time.monotonic() + self._limits.pdu_timeout_s  # a new PDU begins
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            self._violate(self._late_reason())
        in_header = self._body_left == 0
        want = min(bufsize, _HEADER.size - len(self._header) if in_header else self._body_left)
        self.settimeout(remaining)
        try:
            data = super().recv(want, flags)
        except TimeoutError:
            self._violate(self._late_reason())
        finally:
            if not self.closed:
                self.settimeout(self._limits.network_timeout_s)
        if data:
            self._follow(data, in_header=in_header)
        return data

    def _follow(self, data: bytes, *, in_header: bool) -> None:
        if not in_header:
            self._body_left -= len(data)
            if self._body_left == 0:
                self._pdus += 1
            return
        self._header += data
        if len(self._header) < _HEADER.size:
            return
        _, _, length = _HEADER.unpack(self._header)
        self._header.clear()
        cap = self._limits.max_associate_rq_bytes if self._pdus == 0 else self._limits.max_pdu_bytes
        if length > cap:
            self._violate(PDU_TOO_LARGE)
        self._body_left = length
        if length == 0:
            self._pdus += 1

    def _late_reason(self) -> str:
        return ASSOCIATION_TIMEOUT if self._pdus == 0 else PDU_TIMEOUT

    def _violate(self, reason: str) -> NoReturn:
        """Abort: tell the peer (best effort), close without reading on, and stop pynetdicom's read.

        Closing with unread data makes the kernel reset the connection, so a sender still
        streaming a declared-huge PDU stops at once.
        """
        log.warning("DIMSE connection aborted", extra={"event": "dimse.connection.aborted", "reason": reason})
        with contextlib.suppress(Exception):  # counted before the peer can see the close
            self._on_violation(reason)
        with contextlib.suppress(OSError):
            self.settimeout(_ABORT_SEND_TIMEOUT_S)
            self.sendall(_ABORT_PDU)
        self.close()
        raise PduLimitExceededError(reason)


@dataclass(slots=True)
class _Connection:
    sock: GuardedSocket
    association: Association | None = None

    @property
    def live(self) -> bool:
        """Open and not yet served to its end. A connection whose association thread still
        lingers after the socket was closed (an abort) no longer counts against its peer."""
        if self.sock.closed:
            return False
        association = self.association
        return association is None or association.ident is None or association.is_alive()


class _GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, which also tells the server which association serves the socket."""

    def _create_association(self) -> Association:
        association = super()._create_association()
        server = self.server
        if isinstance(server, LimitedAssociationServer):
            server.attach(self.request, association)
        return association


class LimitedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with guarded sockets and per-peer connection limits.

    ``on_reject(reason)`` is told of every connection closed by a limit (at accept, or later by
    a :class:`GuardedSocket`); its errors are ignored.
    """

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int],
        *,
        limits: PduLimits,
        max_per_peer: int,
        max_connections: int,
        on_reject: Callable[[str], None],
        evt_handlers: list[evt.EventHandlerType],
    ) -> None:
        if max_per_peer < 1 or max_connections < 1:
            raise ValueError("connection limits must be at least 1")
        self._limits = limits
        self._max_per_peer = max_per_peer
        self._max_connections = max_connections
        self._on_reject = on_reject
        self._connections: dict[str, list[_Connection]] = {}
        self._connections_lock = threading.Lock()
        super().__init__(
            ae,
            address,
            ae.ae_title,
            ae.supported_contexts,
            None,
            evt_handlers=evt_handlers,
            request_handler=_GuardedRequestHandler,
        )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listener = self.socket
        if listener is None:  # bound in __init__; closed only by shutdown
            raise OSError("the listening socket is closed")
        sock, address = listener.accept()
        return GuardedSocket.adopt(sock, self._limits, self._reject), address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection only under the per-peer and overall caps (else it is closed now)."""
        if not isinstance(request, GuardedSocket):
            return False
        peer = str(client_address[0])
        with self._connections_lock:
            for address in list(self._connections):
                kept = [c for c in self._connections[address] if c.live]
                if kept:
                    self._connections[address] = kept
                else:
                    del self._connections[address]
            total = sum(len(held) for held in self._connections.values())
            held = self._connections.get(peer, [])
            reason = PEER_LIMIT if len(held) >= self._max_per_peer else None
            if reason is None and total >= self._max_connections:
                reason = CONNECTION_LIMIT
            if reason is None:
                self._connections.setdefault(peer, []).append(_Connection(request))
                return True
        log.warning("DIMSE connection refused", extra={"event": "dimse.connection.refused", "reason": reason})
        self._reject(reason)
        return False

    def attach(self, sock: socket.socket, association: Association) -> None:
        with self._connections_lock:
            for held in self._connections.values():
                for connection in held:
                    if connection.sock is sock:
                        connection.association = association
                        return

    def _reject(self, reason: str) -> None:
        try:
            self._on_reject(reason)
        except Exception as error:  # noqa: BLE001 - a metrics hook must not break the server
            log.error(  # noqa: TRY400 - the class name is enough
                "DIMSE event hook failed", extra={"event": "dimse.hook.failed", "exc_type": type(error).__name__}
            )
