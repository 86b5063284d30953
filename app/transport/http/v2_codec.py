"""Open Inference Protocol v2 (KServe / Triton) HTTP bodies: JSON and the binary tensor extension.

With the binary extension the body is a JSON header of ``Inference-Header-Content-Length``
bytes followed by raw tensors, each announced by ``parameters.binary_data_size``. Shapes and
sizes are checked against the tensor cap before any tensor is decoded.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import InvalidTensorError, MalformedBodyError
from app.inference.tensors import DTYPES, Tensors, check_declared_size, datatype_of
from app.parsing.numbers import loads_bounded_ints

HEADER_LENGTH = "inference-header-content-length"


class V2Input(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=256)
    shape: list[int] = Field(max_length=16)
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=256)
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = Field(default=None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[V2Input] = Field(min_length=1, max_length=64)
    outputs: list[V2RequestedOutput] | None = Field(default=None, max_length=64)


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(default=None, description="Row-major values; absent for binary outputs.")


class V2Provenance(BaseModel):
    """The model behind an answer, as response ``parameters`` (the protocol allows a parameters
    object on the response; clients that do not know these keys ignore them)."""

    model_sha256: str = Field(description="sha256 of the ONNX file that produced the outputs.")
    not_for_clinical_use: bool = Field(description="The model must not inform care.")
    intended_use: str = Field(description="The model's declared intended use.")


class V2InferResponse(BaseModel):
    """Documentation of the response shape (the encoder writes it directly, for speed)."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: V2Provenance
    outputs: list[V2OutputTensor]


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    request: V2InferRequest
    tensors: Tensors
    binary_outputs: frozenset[str]
    requested: tuple[str, ...] | None


def _decode_bytes_elements(raw: bytes, count: int, name: str) -> npt.NDArray[np.generic]:
    items: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise InvalidTensorError(f"input {name!r}: BYTES data ends inside an element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidTensorError(f"input {name!r}: BYTES element overruns the data")
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidTensorError(f"input {name!r}: {len(raw) - offset} bytes left after {count} BYTES elements")
    return np.array(items, dtype=object)


def _tensor_from_json(spec: V2Input, count: int) -> npt.NDArray[np.generic]:
    if spec.data is None:
        raise InvalidTensorError(f"input {spec.name!r}: no 'data' and no binary_data_size")
    if spec.datatype == "BYTES":
        flat = np.array(
            [x.encode() if isinstance(x, str) else x for x in np.ravel(np.array(spec.data, dtype=object))], dtype=object
        )
    else:
        try:
            flat = np.asarray(spec.data, dtype=DTYPES[spec.datatype]).reshape(-1)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidTensorError(f"input {spec.name!r}: data is not a list of {spec.datatype} values") from exc
    if flat.size != count:
        raise InvalidTensorError(f"input {spec.name!r}: {flat.size} elements for shape {spec.shape} ({count} expected)")
    return flat.reshape(spec.shape)


def _tensor_from_binary(spec: V2Input, raw: bytes, count: int) -> npt.NDArray[np.generic]:
    if spec.datatype == "BYTES":
        return _decode_bytes_elements(raw, count, spec.name).reshape(spec.shape)
    dtype = DTYPES[spec.datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidTensorError(
            f"input {spec.name!r}: {len(raw)} bytes for shape {spec.shape} of {spec.datatype} "
            f"({count * dtype.itemsize} expected)"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(spec.shape)


def decode_request(body: bytes, header_length: int | None, max_tensor_bytes: int) -> DecodedRequest:
    """Parse a v2 infer body. Raises :class:`MalformedBodyError` or :class:`InvalidTensorError`."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise MalformedBodyError(
            f"Inference-Header-Content-Length {header_length} does not fit a {len(body)}-byte body"
        )
    header = body if header_length is None else body[:header_length]
    try:
        raw = loads_bounded_ints(header)  # an integer over 20 digits is refused here, before numpy sees it
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, deep nesting
        raise MalformedBodyError("inference request header is not valid JSON") from exc
    try:
        request = V2InferRequest.model_validate(raw)
    except ValidationError as exc:
        where = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors()[:3])
        raise MalformedBodyError(f"inference request does not follow the protocol at: {where}") from exc

    offset = header_length or len(body)
    tensors: Tensors = {}
    for spec in request.inputs:
        if spec.datatype not in DTYPES:
            raise InvalidTensorError(f"input {spec.name!r}: unknown datatype {spec.datatype!r}")
        if spec.name in tensors:
            raise InvalidTensorError(f"input {spec.name!r} appears twice")
        count = check_declared_size(spec.name, spec.datatype, spec.shape, max_tensor_bytes)
        size = (spec.parameters or {}).get("binary_data_size")
        if size is None:
            tensors[spec.name] = _tensor_from_json(spec, count)
            continue
        if header_length is None:
            raise MalformedBodyError(f"input {spec.name!r} has binary_data_size but no Inference-Header-Content-Length")
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise InvalidTensorError(f"input {spec.name!r}: binary_data_size {size!r} overruns the body")
        tensors[spec.name] = _tensor_from_binary(spec, body[offset : offset + size], count)
        offset += size
    if offset != len(body):
        raise MalformedBodyError(f"{len(body) - offset} bytes after the last binary input")

    all_binary = bool((request.parameters or {}).get("binary_data_output", False))
    requested = tuple(o.name for o in request.outputs) if request.outputs is not None else None
    binary = {o.name for o in request.outputs or () if bool((o.parameters or {}).get("binary_data", all_binary))}
    return DecodedRequest(
        request=request,
        tensors=tensors,
        binary_outputs=frozenset(binary) if requested is not None else frozenset({"*"} if all_binary else ()),
        requested=requested,
    )


def _binary(array: npt.NDArray[np.generic]) -> bytes:
    if array.dtype == object or array.dtype.kind in {"S", "U"}:
        parts = []
        for item in array.ravel():
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_response(
    model: str,
    version: str,
    request_id: str | None,
    outputs: Mapping[str, npt.NDArray[np.generic]],
    decoded: DecodedRequest,
    *,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when binary outputs follow it.

    ``parameters`` (the model's provenance) goes in the JSON header in both forms, so a client of
    the binary extension reads it where it reads the output descriptions.
    """
    names = decoded.requested if decoded.requested is not None else tuple(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise InvalidTensorError(f"unknown output(s) {unknown}; the model has {sorted(outputs)}")
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if "*" in decoded.binary_outputs or name in decoded.binary_outputs:
            blob = _binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype == object:
            entry["data"] = [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in array.ravel()]
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request_id is not None:
        response["id"] = request_id
    if parameters is not None:
        response["parameters"] = dict(parameters)
    header = json.dumps(response, separators=(",", ":"), allow_nan=True).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def deadline_from_parameters(parameters: Mapping[str, Any] | None) -> float | None:
    """Triton's ``timeout`` request parameter, in microseconds, as seconds."""
    timeout = (parameters or {}).get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
        raise InvalidTensorError("parameter 'timeout' must be a positive number of microseconds")
    return float(timeout) / 1e6
