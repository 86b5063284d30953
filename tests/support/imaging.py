"""Helpers for the imaging tests: wait on an observable condition, send one C-STORE."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable
from typing import Any

import pydicom
from fastapi.testclient import TestClient
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

BOUNDARY = "medinfer-test-boundary"


def stow(client: TestClient, key: str, *parts: bytes) -> Any:
    """STOW-RS of ``parts`` (DICOM Part 10 instances) to ``/dicomweb/studies``."""
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return client.post(
        "/dicomweb/studies",
        content=body + f"--{BOUNDARY}--\r\n".encode(),
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        },
    )


def until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    """Poll ``condition`` (the database, the PACS, the metrics) until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def c_store(port: int, encoded: bytes, *, calling_ae: str = "HOSPITALPACS") -> Dataset:
    """One CR instance to the service's SCP on ``port``; the C-STORE response status dataset."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ComputedRadiographyImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDINFER")
    assert assoc.is_established
    try:
        return assoc.send_c_store(pydicom.dcmread(io.BytesIO(encoded)))
    finally:
        assoc.release()


def closed_by_peer(sock: socket.socket, wait_s: float = 15.0) -> bool:
    """True once the peer closes or resets the connection (an A-ABORT may come first)."""
    sock.settimeout(wait_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True
