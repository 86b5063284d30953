"""Builds the object graph from :class:`Settings` and tears it down: the one place that wires
engines, registries and metrics together. ``create_app`` calls it from the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pydicom.config
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.audit.checkpoint import Checkpointer, load_previous_keys, load_signing_key, load_verify_keys, replica_id
from app.audit.recorder import AuditWriter, create_audit_engine
from app.audit.verifier import ChainVerifier
from app.config import Settings
from app.db import create_async_db, create_sync_engine, database_reachable
from app.domain import Readiness
from app.errors import MedinferError
from app.inference.batcher import BatcherPool
from app.inference.registry import ClinicalUsePolicy, ModelRegistry
from app.inference.spec import iter_model_dirs
from app.observability.drift import DriftMonitor
from app.observability.metrics import Metrics
from app.pipeline import Pipeline
from app.preprocess.memory import decode_concurrency
from app.security.clients import PrincipalCache
from app.security.keys import load_ed25519_public_key
from app.security.keystore import KeyStore
from app.security.oauth import OAuthVerifier

log = logging.getLogger(__name__)


def clinical_use_policy(settings: Settings) -> ClinicalUsePolicy:
    """The production gate for not-for-clinical-use models, from the settings."""
    return ClinicalUsePolicy(production=settings.env == "production", acknowledged=settings.acknowledged)


@dataclass
class Container:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    registry: ModelRegistry
    metrics: Metrics
    pipeline: Pipeline
    audit_engine: Engine
    keys: KeyStore
    oauth: OAuthVerifier | None
    principals: PrincipalCache
    verifier: ChainVerifier
    checkpointer: Checkpointer | None
    reader_engine: Engine
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def build(cls, settings: Settings, metrics: Metrics) -> Container:
        """Create the objects (inside the running event loop: the audit writer starts a task).

        No connection is opened and no model is read yet.
        """
        # pydicom warns and logs about invalid element values by quoting them, which would put
        # patient data in logs; app.parsing.dicom validates what matters and names attributes only.
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        engine, sessionmaker = create_async_db(settings)
        trusted = (
            load_ed25519_public_key(settings.model_signing_public_key) if settings.model_signing_public_key else None
        )
        registry = ModelRegistry(
            settings.model_repository, trusted, policy=clinical_use_policy(settings), metrics=metrics
        )
        metrics.watch_models(registry.statuses)
        audit_engine = create_audit_engine(settings.sqlalchemy_url, settings.database_timeout_s)
        audit = (
            AuditWriter(
                audit_engine,
                settings.audit_hmac_key.get_secret_value().encode(),
                settings.pseudonym_key.get_secret_value().encode(),
                metrics,
            )
            if settings.audit_enabled
            else None
        )
        # Reads the head for checkpoints and the chain for verification: a plain engine, since
        # on SQLite every transaction of the writer's engine takes the write lock.
        reader_engine = create_sync_engine(settings)
        hmac_key = settings.audit_hmac_key.get_secret_value().encode()
        checkpointer = (
            Checkpointer(
                reader_engine,
                load_signing_key(settings),
                settings.resolved_checkpoint_dir,
                replica_id(),
                previous_keys=load_previous_keys(settings),
                on_refused=metrics.audit_checkpoints_refused.inc,
            )
            if settings.audit_enabled
            else None
        )
        verifier = ChainVerifier(reader_engine, hmac_key, settings.resolved_checkpoint_dir, load_verify_keys(settings))
        metrics.watch_gpus()
        pipeline = Pipeline(
            registry, BatcherPool(metrics), audit, metrics, DriftMonitor(metrics),
            decode_slots=decode_concurrency(settings),
        )  # fmt: skip
        keys = KeyStore(settings.resolved_keys_dir, settings.key_encryption_key.get_secret_value()).load()
        max_age = timedelta(days=settings.key_max_age_days)
        metrics.watch_keys(lambda: keys.rotation_due(max_age))
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            registry=registry,
            metrics=metrics,
            pipeline=pipeline,
            audit_engine=audit_engine,
            keys=keys,
            principals=PrincipalCache(settings.auth_cache_s),
            verifier=verifier,
            checkpointer=checkpointer,
            reader_engine=reader_engine,
            oauth=(
                OAuthVerifier(settings.oauth_jwks_file, settings.oauth_issuer or "", settings.jwt_audience)
                if settings.oauth_jwks_file
                else None
            ),
        )

    async def start(self) -> None:
        """Begin loading models off the event loop; ``/readyz`` turns true when done."""
        loading = self._spawn(asyncio.to_thread(self._load_all), "model-load")
        if self.settings.model_poll_interval_s > 0:
            self._spawn(self._poll_repository(self.settings.model_poll_interval_s, loading), "model-poll")
        if self.checkpointer is not None:
            self._spawn(self.checkpointer.run(self.settings.audit_checkpoint_interval_s), "audit-checkpoint")
        log.info("service starting", extra={"event": "service.start"})

    def _load_all(self) -> None:
        self.registry.load_all()
        self.pipeline.watch_served()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _poll_repository(self, interval_s: float, loading: asyncio.Task[None]) -> None:
        """Reload a model when its files change, load new ones, unload removed ones.

        A changed version goes through the same checks as an explicit reload; if it fails, the
        serving version stays and the failure shows in ``/readyz`` and the metrics.
        """
        seen: dict[str, tuple[tuple[str, int, int], ...]] = {}
        await asyncio.shield(loading)
        for name in self.registry.loaded_names():
            seen[name] = self.registry.fingerprint(name)
        while True:
            await asyncio.sleep(interval_s)
            present = {d.name for d in iter_model_dirs(self.registry.repository)}
            for name in sorted(present):
                fingerprint = self.registry.fingerprint(name)
                if seen.get(name) == fingerprint:
                    continue
                seen[name] = fingerprint
                try:
                    await asyncio.to_thread(self.registry.load, name)
                except MedinferError as exc:
                    log.warning(
                        "polled reload refused", extra={"event": "model.poll_refused", "model": name, "code": exc.code}
                    )
            for name in set(seen) - present:
                del seen[name]
                with contextlib.suppress(MedinferError):
                    self.registry.unload(name)
            self.pipeline.retire_unserved()

    async def aclose(self) -> None:
        # A session being created in a thread cannot be interrupted; wait for it to finish.
        for task in self._tasks:
            if task.get_name() in {"model-poll", "audit-checkpoint"}:
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pipeline.batchers.aclose()
        if self.pipeline.audit is not None:
            await self.pipeline.audit.aclose()
        if self.checkpointer is not None:
            # After the writer's last commit: the final head is anchored outside the database.
            await self.checkpointer.checkpoint()
        self.audit_engine.dispose()
        self.reader_engine.dispose()
        await self.engine.dispose()
        log.info("service stopped", extra={"event": "service.stop"})

    async def readiness(self) -> Readiness:
        database = await database_reachable(self.engine, self.settings.database_timeout_s)
        return Readiness(
            database=database,
            models_loaded=self.registry.models_ready(),
            models=self.registry.statuses(),
        )
