"""The dynamic batcher: each request gets its own rows, batches form, limits hold, errors reach everyone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from app.errors import DeadlineExceededError, InferenceFailedError, OverloadedError
from app.inference.batcher import BatchPolicy, DynamicBatcher
from app.inference.registry import ModelRegistry, ServedVersion
from app.observability.metrics import Metrics
from tests.support.models import write_gather_model, write_model


def _served(tmp_path: Path, name: str) -> ServedVersion:
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    return registry.get(name)


def _policy(**overrides: float) -> BatchPolicy:
    values: dict[str, float] = {
        "max_batch_size": 8,
        "max_queue_delay_s": 0.05,
        "max_queue_size": 64,
        "instance_count": 1,
    } | overrides
    return BatchPolicy(
        max_batch_size=int(values["max_batch_size"]),
        max_queue_delay_s=values["max_queue_delay_s"],
        max_queue_size=int(values["max_queue_size"]),
        instance_count=int(values["instance_count"]),
    )


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_concurrent_requests_each_get_exactly_their_own_rows(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 3})
    served = _served(tmp_path, "alpha")
    rng = np.random.default_rng(0)
    # Requests of 1 to 3 rows each, all distinct.
    requests = [rng.normal(size=(1 + i % 3, 3)).astype(np.float32) for i in range(24)]
    expected = [served.loaded.session.run(["probabilities"], {"features": x})[0] for x in requests]
    metrics = Metrics()

    async def scenario() -> list[np.ndarray]:
        batcher = DynamicBatcher(served, _policy(), metrics)
        try:
            results = await asyncio.gather(*(batcher.infer({"features": x}, None) for x in requests))
        finally:
            await batcher.aclose()
        return [r["probabilities"] for r in results]

    got = asyncio.run(scenario())
    for mine, want, sent in zip(got, expected, requests, strict=True):
        assert mine.shape == (sent.shape[0], 2)
        np.testing.assert_allclose(mine, want, rtol=1e-6, atol=1e-7)
    text = metrics.registry_text()
    batches = _sample(text, "medinfer_inference_batch_size_count")
    rows = _sample(text, "medinfer_inference_batch_size_sum")
    assert rows == sum(x.shape[0] for x in requests)
    assert batches < len(requests), "concurrent requests should have been batched together"


def test_a_full_queue_refuses_with_retry_after(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    served = _served(tmp_path, "alpha")

    async def scenario() -> tuple[int, list[BaseException]]:
        batcher = DynamicBatcher(served, _policy(max_queue_size=4, max_queue_delay_s=0.2), Metrics())
        x = np.zeros((1, 3), np.float32)
        tasks = [asyncio.create_task(batcher.infer({"features": x}, None)) for _ in range(10)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.aclose()
        errors = [r for r in results if isinstance(r, BaseException)]
        return sum(1 for r in results if not isinstance(r, BaseException)), errors

    ok, errors = asyncio.run(scenario())
    assert ok >= 4
    assert errors
    assert all(isinstance(e, OverloadedError) and e.retry_after_s for e in errors)


def test_requests_whose_deadline_passes_in_the_queue_are_not_run(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    served = _served(tmp_path, "alpha")
    metrics = Metrics()

    async def scenario() -> tuple[object, object]:
        batcher = DynamicBatcher(served, _policy(max_queue_delay_s=0.2, max_batch_size=64), metrics)
        x = np.zeros((1, 3), np.float32)
        expired = asyncio.create_task(batcher.infer({"features": x}, time.monotonic() + 0.01))
        alive = asyncio.create_task(batcher.infer({"features": x}, time.monotonic() + 10))
        results = await asyncio.gather(expired, alive, return_exceptions=True)
        await batcher.aclose()
        return results[0], results[1]

    expired, alive = asyncio.run(scenario())
    assert isinstance(expired, DeadlineExceededError)
    assert isinstance(alive, dict)
    assert _sample(metrics.registry_text(), "medinfer_inference_batch_size_sum") == 1.0


def test_an_onnx_runtime_failure_answers_every_request_of_its_batch(tmp_path: Path) -> None:
    write_gather_model(tmp_path, delay_ms=100)
    served = _served(tmp_path, "gather")

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(served, _policy(max_queue_delay_s=0.1), Metrics())
        good = np.array([[1]], np.int64)
        bad = np.array([[10]], np.int64)
        tasks = [
            batcher.infer({"index": good}, None),
            batcher.infer({"index": bad}, None),
            batcher.infer({"index": good}, None),
        ]
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        # The batcher survives a failed batch.
        after = await batcher.infer({"index": np.array([[2]], np.int64)}, None)
        await batcher.aclose()
        return [*results, after]

    first, second, third, after = asyncio.run(scenario())
    assert all(isinstance(r, InferenceFailedError) for r in (first, second, third))
    assert isinstance(after, dict)
    assert after["value"].tolist() == [[12.0]]


def test_closing_drains_what_is_queued(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    served = _served(tmp_path, "alpha")

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(served, _policy(max_queue_delay_s=0.5), Metrics())
        tasks = [asyncio.create_task(batcher.infer({"features": np.zeros((1, 3), np.float32)}, None)) for _ in range(3)]
        await asyncio.sleep(0)
        await batcher.aclose()
        return await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(r, dict) for r in asyncio.run(scenario()))


@pytest.mark.parametrize("shape_b", [(1, 3), (2, 3)])
def test_rows_are_split_back_by_count(tmp_path: Path, shape_b: tuple[int, int]) -> None:
    write_model(tmp_path, "alpha", {"1": 5})
    served = _served(tmp_path, "alpha")
    a = np.ones((2, 3), np.float32)
    b = np.full(shape_b, -1.0, np.float32)

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        batcher = DynamicBatcher(served, _policy(), Metrics())
        ra, rb = await asyncio.gather(batcher.infer({"features": a}, None), batcher.infer({"features": b}, None))
        await batcher.aclose()
        return ra["probabilities"], rb["probabilities"]

    ra, rb = asyncio.run(scenario())
    assert ra.shape == (2, 2)
    assert rb.shape == (shape_b[0], 2)
    assert not np.allclose(ra[0], rb[0])
