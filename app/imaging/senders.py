"""Outbound STOW-RS (PS3.18 §10.5) to a DICOMweb destination, for the PACS outbox.

The DIMSE sender (C-STORE SCU) lives with the DIMSE transport; both satisfy
:class:`app.imaging.outbox.Sender`.
"""

from __future__ import annotations

import secrets
from typing import Final

import httpx

from app.errors import DeliveryError

_STORED: Final = frozenset({200})
_PARTIAL: Final = frozenset({202})


class StowSender:
    def __init__(self, base_url: str, *, timeout_s: float = 30.0, headers: dict[str, str] | None = None) -> None:
        """``base_url`` is the DICOMweb service root (``.../dicom-web``); objects go to ``/studies``."""
        self._url = base_url.rstrip("/") + "/studies"
        self._timeout_s = timeout_s
        self._headers = headers or {}

    @property
    def destination(self) -> str:
        return self._url

    def send(self, encoded: bytes) -> None:
        boundary = secrets.token_hex(16)
        body = b"".join(
            (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                encoded,
                f"\r\n--{boundary}--\r\n".encode(),
            )
        )
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        try:
            response = httpx.post(
                self._url,
                content=body,
                headers={**self._headers, "Content-Type": content_type, "Accept": "application/dicom+json"},
                timeout=self._timeout_s,
            )
        except httpx.HTTPError as exc:
            raise DeliveryError(f"STOW-RS request failed: {type(exc).__name__}") from exc
        if response.status_code in _STORED:
            return
        if response.status_code in _PARTIAL:
            raise DeliveryError("STOW-RS destination stored the object only with a failure (202)")
        raise DeliveryError(f"STOW-RS destination answered HTTP {response.status_code}")
