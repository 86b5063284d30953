"""ONNX Runtime sessions: provider selection with CPU fallback, warm-up.

The providers reported are the ones the session actually loaded (``get_providers()``), not the
ones the wheel was built with, so a node whose CUDA libraries are missing says so plainly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from app.errors import ModelLoadError
from app.inference.spec import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

_NUMPY_DTYPES: Mapping[str, npt.DTypeLike] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

_ORT_FATAL = 4
_ort_state = {"configured": False}
#: Providers the wheel offers but that failed to initialise here (e.g. CUDA libraries absent).
_unusable: set[str] = set()


def configure_ort_logging() -> None:
    """Limit ONNX Runtime's native logger to fatal messages (once per process).

    onnxruntime-gpu on a node without CUDA libraries otherwise prints a stack of library-load
    errors for every session. Real failures still reach us as Python exceptions, and a provider
    that did not load is reported once, as a warning, by :func:`open_session`.
    """
    if not _ort_state["configured"]:
        ort.set_default_logger_severity(_ORT_FATAL)
        _ort_state["configured"] = True


def choose_providers(preferred: Sequence[str]) -> list[str]:
    """The preferred providers this build offers and that have worked here, ending with CPU."""
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available and p not in _unusable and p != "CPUExecutionProvider"]
    chosen.append("CPUExecutionProvider")
    return chosen


def _note_fallback(requested: Sequence[str], loaded: Sequence[str]) -> None:
    missing = [p for p in requested if p not in loaded and p not in _unusable]
    if missing:
        _unusable.update(missing)
        log.warning(
            "execution providers did not load; running on CPU",
            extra={"event": "ort.provider_fallback", "missing": missing, "providers": list(loaded)},
        )


#: How much nicer than the event loop ONNX Runtime's own worker threads run (Linux).
ORT_THREAD_NICENESS = 5


def _thread_ids() -> set[int]:
    try:
        return {int(task.name) for task in Path("/proc/self/task").iterdir()}
    except OSError:
        return set()


def _lower_priority(thread_ids: set[int]) -> None:
    """Let the threads a session just created yield to the event loop.

    ONNX Runtime's intra-op pool takes every core; at equal priority the event loop then waits
    its turn behind it and health probes slow down under load. A few nice levels lower, the pool
    still gets all idle CPU. Best effort: elsewhere than Linux this does nothing.
    """
    for tid in thread_ids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, ORT_THREAD_NICENESS)


@dataclass(frozen=True, slots=True)
class LoadedSession:
    """An ONNX Runtime session and the providers it really runs on."""

    session: ort.InferenceSession
    providers: tuple[str, ...]


def warmup_inputs(inputs: Sequence[TensorSpec]) -> dict[str, npt.NDArray[np.generic]]:
    """Zero tensors of batch size 1 for each declared input."""
    feeds: dict[str, npt.NDArray[np.generic]] = {}
    for tensor in inputs:
        shape = tuple(1 if d == -1 else d for d in tensor.shape)
        if tensor.datatype == "BYTES":
            feeds[tensor.name] = np.full(shape, b"", dtype=object)
        else:
            feeds[tensor.name] = np.zeros(shape, dtype=_NUMPY_DTYPES[tensor.datatype])
    return feeds


def open_session(spec: ModelSpec, model: bytes) -> LoadedSession:
    """Create the session, check its signature against the spec, and run one warm-up batch.

    Raises :class:`ModelLoadError` if ONNX Runtime refuses the file, its inputs or outputs differ
    from ``model.toml``, or the warm-up run fails.
    """
    configure_ort_logging()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    requested = choose_providers(spec.runtime.execution_providers)
    before = _thread_ids()
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=requested)
    except Exception as exc:  # ORT raises its own unexported exception types
        raise ModelLoadError(f"{spec.name}: ONNX Runtime refused the model: {exc}") from exc

    declared_in = {t.name for t in spec.inputs}
    actual_in = {i.name for i in session.get_inputs()}
    declared_out = {t.name for t in spec.outputs}
    actual_out = {o.name for o in session.get_outputs()}
    if declared_in != actual_in or not declared_out <= actual_out:
        raise ModelLoadError(
            f"{spec.name}: graph signature inputs={sorted(actual_in)} outputs={sorted(actual_out)}"
            f" differs from model.toml inputs={sorted(declared_in)} outputs={sorted(declared_out)}"
        )
    try:
        session.run([t.name for t in spec.outputs], warmup_inputs(spec.inputs))
    except Exception as exc:  # ORT raises its own unexported exception types
        raise ModelLoadError(f"{spec.name}: warm-up run failed: {exc}") from exc
    _lower_priority(_thread_ids() - before)
    loaded = tuple(session.get_providers())
    _note_fallback(requested, loaded)
    return LoadedSession(session=session, providers=loaded)
