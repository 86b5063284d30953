"""Input tensors checked against a model's declared signature before they reach a batch.

A request that would fail inside ONNX Runtime (or, worse, silently broadcast) is refused here
with a message naming the input; nothing here echoes tensor values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

from app.errors import InvalidTensorError, PayloadTooLargeError
from app.inference.spec import ModelSpec

Tensors = dict[str, npt.NDArray[np.generic]]

#: Open Inference Protocol datatype <-> numpy dtype (BYTES travels as numpy object arrays).
DTYPES: Final[Mapping[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}


def datatype_of(array: npt.NDArray[np.generic]) -> str:
    for name, dtype in DTYPES.items():
        if array.dtype == dtype:
            return name
    if array.dtype.kind in {"S", "U"}:
        return "BYTES"
    msg = f"no Open Inference Protocol datatype for {array.dtype}"
    raise InvalidTensorError(msg)


def check_declared_size(name: str, datatype: str, shape: list[int], max_bytes: int) -> int:
    """Element count of a declared shape, refused before any decoding if it exceeds the cap."""
    if any(d < 0 for d in shape):
        raise InvalidTensorError(f"input {name!r}: shape {shape} has a negative dimension")
    count = math.prod(shape)
    itemsize = DTYPES[datatype].itemsize if datatype != "BYTES" else 1
    if count * itemsize > max_bytes:
        raise PayloadTooLargeError(f"input {name!r}: {count * itemsize} bytes exceed the {max_bytes}-byte tensor cap")
    return count


def check_inputs(spec: ModelSpec, inputs: Mapping[str, npt.NDArray[np.generic]]) -> Tensors:
    """Return the inputs if they fit ``spec``; raise :class:`InvalidTensorError` naming the first misfit."""
    declared = {t.name: t for t in spec.inputs}
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise InvalidTensorError(f"unknown input(s) {unknown}; {spec.name} expects {sorted(declared)}")
    missing = sorted(set(declared) - set(inputs))
    if missing:
        raise InvalidTensorError(f"missing input(s) {missing} for {spec.name}")
    batch: int | None = None
    for name, tensor in declared.items():
        array = inputs[name]
        expected = DTYPES[tensor.datatype]
        if array.dtype != expected and not (tensor.datatype == "BYTES" and array.dtype.kind in {"O", "S", "U"}):
            raise InvalidTensorError(f"input {name!r}: datatype {datatype_of(array)}, model expects {tensor.datatype}")
        if array.ndim != len(tensor.shape):
            raise InvalidTensorError(
                f"input {name!r}: shape {list(array.shape)} has rank {array.ndim}, model expects {list(tensor.shape)}"
            )
        for axis, (got, want) in enumerate(zip(array.shape, tensor.shape, strict=True)):
            if want not in (-1, got):
                raise InvalidTensorError(
                    f"input {name!r}: dimension {axis} is {got}, model expects {want} (shape {list(tensor.shape)})"
                )
        rows = int(array.shape[0])
        if rows < 1:
            raise InvalidTensorError(f"input {name!r}: empty batch")
        if rows > spec.batching.max_batch_size:
            raise InvalidTensorError(
                f"input {name!r}: batch of {rows} exceeds the model's max_batch_size {spec.batching.max_batch_size}"
            )
        if batch is not None and rows != batch:
            raise InvalidTensorError(f"inputs disagree on the batch size ({batch} vs {rows} for {name!r})")
        batch = rows
        if array.dtype.kind == "f" and not tensor.allow_non_finite and not np.isfinite(array).all():
            raise InvalidTensorError(f"input {name!r}: NaN or Inf values, which this model does not accept")
    return dict(inputs)
