"""Builds the imaging service from the container's settings and collaborators."""

from __future__ import annotations

from app.config import Settings, service_version
from app.container import Container
from app.imaging.ingest import ImagingService
from app.imaging.outbox import Outbox, Sender
from app.imaging.routing import Router, parse_routes
from app.parsing.dicom import DicomLimits
from app.security.sealed import SealedFiles


def dicom_limits(settings: Settings) -> DicomLimits:
    return DicomLimits(
        max_bytes=settings.dicom_max_instance_bytes,
        max_pixel_bytes=settings.dicom_max_pixel_bytes,
        max_frames=settings.dicom_max_frames,
    )


def build_imaging(container: Container, sender: Sender | None) -> ImagingService:
    """``sender`` delivers SR to the PACS; None keeps results in the outbox (state ``held``)."""
    settings = container.settings
    kek = settings.key_encryption_key.get_secret_value()
    outbox = Outbox(
        container.sessionmaker,
        SealedFiles(settings.data_dir / "outbox", kek, "outbox"),
        sender,
        container.metrics,
        retry_base_s=settings.pacs_retry_base_s,
        max_attempts=settings.pacs_max_attempts,
        audit=container.pipeline.record,
    )
    router = Router(parse_routes(settings.imaging_routes) if settings.imaging_routes else ())
    return ImagingService(
        container.pipeline,
        router,
        SealedFiles(settings.resolved_spool_dir, kek, "spool"),
        outbox,
        container.metrics,
        limits=dicom_limits(settings),
        settle_s=settings.study_settle_s,
        drain_s=settings.study_drain_s,
        min_free_bytes=settings.dicom_spool_min_free_bytes,
        software_version=service_version(),
        policy=container.registry.policy,
    )
