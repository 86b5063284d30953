"""Dynamic batching per model version, the way Triton does it.

Requests queue per served version. A collector task takes the oldest request, gathers more
whose tensors can be stacked with it (same non-batch shape and dtype) until ``max_batch_size``
rows or ``max_queue_delay`` has passed, drops requests whose deadline expired while queued,
and hands the batch to a worker thread: stacking, ``session.run`` and slicing all happen off
the event loop. Each request gets exactly its own rows back, or the error of its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from app.errors import DeadlineExceededError, InferenceFailedError, MedinferError, OverloadedError
from app.inference.registry import ServedVersion
from app.observability.metrics import Metrics

log = logging.getLogger(__name__)

Tensors = dict[str, npt.NDArray[np.generic]]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int
    instance_count: int
    overload_retry_after_s: float = 1.0


@dataclass(slots=True)
class BatchTiming:
    """Filled in by the batcher for callers that report where the time went."""

    queue_s: float = 0.0
    compute_s: float = 0.0


@dataclass(slots=True)
class _Pending:
    inputs: Tensors
    rows: int
    signature: tuple[tuple[str, str, tuple[int, ...]], ...]
    deadline: float | None
    enqueued: float
    future: asyncio.Future[Tensors] = field(repr=False)
    timing: BatchTiming | None = None


def _signature(inputs: Mapping[str, npt.NDArray[np.generic]]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return tuple(sorted((name, arr.dtype.str, tuple(arr.shape[1:])) for name, arr in inputs.items()))


def _run_batch(served: ServedVersion, batch: list[Tensors], output_names: list[str]) -> list[Tensors]:
    """Stack, run and split; called in a worker thread."""
    if len(batch) == 1:
        feeds = batch[0]
    else:
        feeds = {name: np.concatenate([item[name] for item in batch], axis=0) for name in batch[0]}
    outputs = served.loaded.session.run(output_names, feeds)
    results: list[Tensors] = []
    start = 0
    for item in batch:
        rows = next(iter(item.values())).shape[0]
        results.append(
            {name: np.asarray(out[start : start + rows]) for name, out in zip(output_names, outputs, strict=True)}
        )
        start += rows
    if start != outputs[0].shape[0]:
        msg = f"model returned {outputs[0].shape[0]} rows for {start} input rows"
        raise InferenceFailedError(msg)
    return results


class DynamicBatcher:
    """The queue and collector for one served version."""

    def __init__(self, served: ServedVersion, policy: BatchPolicy, metrics: Metrics) -> None:
        self.served = served
        self.policy = policy
        self._metrics = metrics
        self._labels = {"model": served.spec.name, "version": served.version}
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.instance_count)
        self._executor = ThreadPoolExecutor(
            max_workers=policy.instance_count, thread_name_prefix=f"ort-{served.spec.name}-{served.version}"
        )
        self._output_names = [t.name for t in served.spec.outputs]
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._collector = asyncio.create_task(self._collect(), name=f"batcher-{served.spec.name}-{served.version}")

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def infer(self, inputs: Tensors, deadline: float | None, timing: BatchTiming | None = None) -> Tensors:
        """Queue one request (its tensors carry the batch axis first) and await its rows.

        Raises :class:`OverloadedError` when the queue is full, :class:`DeadlineExceededError`
        if ``deadline`` (``time.monotonic()`` seconds) passes while it waits, and
        :class:`InferenceFailedError` if ONNX Runtime fails on its batch.
        """
        if self._closing:
            raise OverloadedError(
                "model version is being retired; retry", retry_after_s=self.policy.overload_retry_after_s
            )
        if len(self._queue) >= self.policy.max_queue_size:
            self._metrics.inference_requests.labels(**self._labels, outcome="rejected").inc()
            raise OverloadedError(
                f"queue for {self.served.spec.name} v{self.served.version} is full",
                retry_after_s=self.policy.overload_retry_after_s,
            )
        rows = int(next(iter(inputs.values())).shape[0])
        pending = _Pending(
            inputs=inputs,
            rows=rows,
            signature=_signature(inputs),
            deadline=deadline,
            enqueued=time.monotonic(),
            future=asyncio.get_running_loop().create_future(),
            timing=timing,
        )
        self._queue.append(pending)
        self._metrics.queue_depth.labels(**self._labels).set(len(self._queue))
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller went away (client disconnect): leave nothing behind in the queue.
            with contextlib.suppress(ValueError):
                self._queue.remove(pending)
            raise

    async def _collect(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            try:
                batch = await self._gather()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _gather(self) -> list[_Pending]:
        """Take the oldest request and whatever can join it before the delay runs out."""
        first = self._queue[0]
        wait_until = first.enqueued + self.policy.max_queue_delay_s
        while True:
            rows = sum(p.rows for p in self._queue if p.signature == first.signature)
            remaining = wait_until - time.monotonic()
            if rows >= self.policy.max_batch_size or remaining <= 0 or self._closing:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
        now = time.monotonic()
        batch: list[_Pending] = []
        taken = 0
        keep: deque[_Pending] = deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():
                continue
            if pending.deadline is not None and pending.deadline <= now:
                self._metrics.inference_requests.labels(**self._labels, outcome="deadline").inc()
                pending.future.set_exception(DeadlineExceededError("deadline passed while queued; not run"))
                continue
            fits = not batch or taken + pending.rows <= self.policy.max_batch_size
            if pending.signature == first.signature and fits:
                batch.append(pending)
                taken += pending.rows
            else:
                keep.append(pending)
        self._queue = keep
        self._metrics.queue_depth.labels(**self._labels).set(len(self._queue))
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        for pending in batch:
            self._metrics.queue_seconds.labels(**self._labels).observe(started - pending.enqueued)
        self._metrics.batch_size.labels(**self._labels).observe(sum(p.rows for p in batch))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._executor, _run_batch, self.served, [p.inputs for p in batch], self._output_names
            )
        except Exception as exc:  # ORT raises its own unexported exception types
            error = (
                exc
                if isinstance(exc, MedinferError)
                else InferenceFailedError(
                    f"{self.served.spec.name} v{self.served.version}: ONNX Runtime failed on a batch of "
                    f"{len(batch)} request(s)"
                )
            )
            log.exception(
                "batch failed",
                extra={
                    "event": "inference.batch_failed",
                    "model": self.served.spec.name,
                    "version": self.served.version,
                    "count": len(batch),
                },
            )
            for pending in batch:
                self._metrics.inference_requests.labels(**self._labels, outcome="error").inc()
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            self._slots.release()
            self._metrics.compute_seconds.labels(**self._labels).observe(time.monotonic() - started)
        finished = time.monotonic()
        for pending, result in zip(batch, results, strict=True):
            if pending.timing is not None:
                pending.timing.queue_s += started - pending.enqueued
                pending.timing.compute_s += finished - started
            self._metrics.inference_requests.labels(**self._labels, outcome="ok").inc()
            if not pending.future.done():
                pending.future.set_result(result)

    async def aclose(self) -> None:
        """Finish what is queued and running, then stop the collector and the worker threads."""
        self._closing = True
        self._wakeup.set()
        await self._collector
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)


class BatcherPool:
    """One batcher per served version, created on first use, retired when no longer served."""

    def __init__(self, metrics: Metrics, *, overload_retry_after_s: float = 1.0) -> None:
        self._metrics = metrics
        self._overload_retry_after_s = overload_retry_after_s
        self._batchers: dict[tuple[str, str, str], DynamicBatcher] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, served: ServedVersion) -> DynamicBatcher:
        key = (served.spec.name, served.version, served.sha256)
        batcher = self._batchers.get(key)
        if batcher is None or batcher.served is not served:
            batching = served.spec.batching
            policy = BatchPolicy(
                max_batch_size=batching.max_batch_size,
                max_queue_delay_s=batching.max_queue_delay_ms / 1000.0,
                max_queue_size=batching.max_queue_size,
                instance_count=served.spec.runtime.instance_count,
                overload_retry_after_s=self._overload_retry_after_s,
            )
            if batcher is not None:
                self._retire(batcher)
            batcher = DynamicBatcher(served, policy, self._metrics)
            self._batchers[key] = batcher
        return batcher

    def retire_unserved(self, served: list[ServedVersion]) -> None:
        """Drain and stop batchers whose version no longer serves (after a reload or unload)."""
        live = {id(s) for s in served}
        for key, batcher in list(self._batchers.items()):
            if id(batcher.served) not in live:
                del self._batchers[key]
                self._retire(batcher)

    def _retire(self, batcher: DynamicBatcher) -> None:
        task = asyncio.create_task(batcher.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        batchers = list(self._batchers.values())
        self._batchers.clear()
        await asyncio.gather(*(b.aclose() for b in batchers), *self._closing, return_exceptions=True)
