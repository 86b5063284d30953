"""The DIMSE node as the service runs it: the SCP feeding the imaging service, and the PACS
sender the outbox uses, both built from settings."""

from __future__ import annotations

from collections.abc import Callable

from app.config import Settings
from app.imaging.ingest import ImagingService
from app.imaging.outbox import Sender
from app.imaging.senders import StowSender
from app.transport.dimse.scp import ScpConfig, StoreScp
from app.transport.dimse.scu import DimseDestination, send_cstore


class DimseSender:
    """C-STORE SCU delivery of outbox objects to the configured PACS."""

    def __init__(self, destination: DimseDestination) -> None:
        self._destination = destination

    @property
    def destination(self) -> str:
        d = self._destination
        return f"dimse://{d.called_ae}@{d.host}:{d.port}"

    def send(self, encoded: bytes) -> None:
        send_cstore(self._destination, encoded)


class ImagingSink:
    """C-STORE -> :meth:`ImagingService.accept`; a domain error becomes the DIMSE status."""

    def __init__(self, imaging: ImagingService) -> None:
        self._imaging = imaging

    def store(self, encoded: bytes, calling_ae: str) -> None:
        self._imaging.accept(encoded, transport="dimse", actor=f"dimse:{calling_ae.strip()}", audit=True)


def pacs_sender(settings: Settings) -> Sender | None:
    url = settings.pacs_destination
    if not url:
        return None
    if url.startswith("dimse://"):
        return DimseSender(DimseDestination.parse(url, settings.dimse_ae_title))
    return StowSender(url)


def scp_config(settings: Settings) -> ScpConfig:
    return ScpConfig(
        ae_title=settings.dimse_ae_title,
        host=settings.dimse_host,
        port=settings.dimse_port,
        allowed_calling_aes=tuple(settings.dimse_allowed_calling_aes),
        max_associations=settings.dimse_max_associations,
        association_timeout_s=settings.dimse_association_timeout_s,
        max_pdu_bytes=settings.dimse_max_pdu_bytes,
        max_associations_per_peer=settings.dimse_max_associations_per_peer,
    )


def dimse_scp(
    settings: Settings, imaging: ImagingService, on_event: Callable[[str, str], None] | None = None
) -> StoreScp | None:
    """The SCP, if enabled. ``on_event(outcome, code)`` counts stores and rejections (metrics)."""
    if not settings.dimse_enabled:
        return None
    return StoreScp(scp_config(settings), ImagingSink(imaging), on_event)
