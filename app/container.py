"""Builds the object graph from :class:`Settings` and tears it down: the one place that wires
engines, registries and metrics together. ``create_app`` calls it from the lifespan."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.config import Settings
from app.db import create_async_db, database_reachable
from app.domain import Readiness
from app.inference.batcher import BatcherPool
from app.inference.registry import ModelRegistry
from app.observability.metrics import Metrics
from app.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class Container:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    registry: ModelRegistry
    metrics: Metrics
    pipeline: Pipeline
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def build(cls, settings: Settings, metrics: Metrics) -> Container:
        """Create the objects. No connection is opened and no model is read yet."""
        engine, sessionmaker = create_async_db(settings)
        registry = ModelRegistry(settings.model_repository)
        metrics.watch_models(registry.statuses)
        pipeline = Pipeline(registry, BatcherPool(metrics))
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            registry=registry,
            metrics=metrics,
            pipeline=pipeline,
        )

    async def start(self) -> None:
        """Begin loading models off the event loop; ``/readyz`` turns true when done."""
        task = asyncio.create_task(asyncio.to_thread(self.registry.load_all), name="model-load")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("service starting", extra={"event": "service.start"})

    async def aclose(self) -> None:
        # A session being created in a thread cannot be interrupted; wait for it to finish.
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pipeline.batchers.aclose()
        await self.engine.dispose()
        log.info("service stopped", extra={"event": "service.stop"})

    async def readiness(self) -> Readiness:
        database = await database_reachable(self.engine, self.settings.database_timeout_s)
        return Readiness(
            database=database,
            models_loaded=self.registry.models_ready(),
            models=self.registry.statuses(),
        )
