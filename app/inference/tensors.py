"""Input tensors checked against a model's declared signature before they reach a batch.

A request that would fail inside ONNX Runtime (or, worse, silently broadcast) is refused here
with a message naming the input; nothing here echoes tensor values.

A model whose ``[preprocessing]`` declares ``features`` also has a feature contract: every row
is checked column by column against each feature's ``valid_range`` and ``codes``, and NaN
("missing") is accepted only in a column the model imputes. This is the same contract the FHIR
path applies before it builds its vector, so every path into the model (v1 records, ``/v2``
tensors) meets one set of rules. A refusal names the row and column, never the value.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import InvalidTensorError, ModelSpecError, PayloadTooLargeError
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
    contract = feature_contract(spec)
    if contract is not None:
        contract.check(inputs[contract.input_name])
    return dict(inputs)


#: A feature tensor is [batch, features].
_FEATURE_RANK: Final = 2


class _DeclaredFeature(BaseModel):
    """The part of ``[[preprocessing.features]]`` the contract reads; other keys belong to parsers."""

    model_config = ConfigDict(extra="allow", frozen=True)

    index: int = Field(ge=0)
    name: str = Field(min_length=1)
    valid_range: tuple[float, float] | None = None
    codes: dict[str, float] = Field(default_factory=dict)


class _DeclaredContract(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    feature_order: tuple[str, ...] | None = None
    missing_policy: str = "reject"
    required: tuple[str, ...] = ()
    features: tuple[_DeclaredFeature, ...] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class ColumnRule:
    """What one column of the feature tensor may hold.

    A coded feature's column must hold one of its codes; its ``valid_range``, where it declares
    one, is not applied to the tensor: it may describe the quantity a code is derived from (the
    glucose behind ``fbs``), and the code table is the stricter rule anyway.
    """

    index: int
    name: str
    valid_range: tuple[float, float] | None
    codes: tuple[float, ...]
    #: Why NaN ("missing") is refused here, or "" where it is accepted: the input allows
    #: non-finite values, the model imputes, and the feature is not required. Inf never is.
    missing_refusal: str

    def reason(self, value: float) -> str:
        """Why ``value`` breaks this rule, in words that do not repeat it."""
        if math.isinf(value):
            return "Inf is never a valid feature value"
        if math.isnan(value):
            return self.missing_refusal
        if self.codes:
            return "value is not one of the declared codes [" + ", ".join(f"{c:g}" for c in self.codes) + "]"
        low, high = self.valid_range or (-math.inf, math.inf)
        return f"value outside the plausible range [{low:g}, {high:g}]"


@dataclass(frozen=True, slots=True)
class FeatureContract:
    """A tabular model's declared feature contract, applied to its one 2-D input.

    The rules are also laid out as per-column arrays, so that a whole batch is checked in a few
    vectorised operations; a column's words are looked up only to explain a refusal.
    """

    input_name: str
    columns: tuple[ColumnRule, ...]
    low: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    missing_ok: npt.NDArray[np.bool_]
    coded: npt.NDArray[np.bool_]
    #: One row of codes per column, padded with NaN (which equals nothing).
    codes: npt.NDArray[np.float64]

    @classmethod
    def of(cls, input_name: str, columns: tuple[ColumnRule, ...]) -> FeatureContract:
        unbounded = (-math.inf, math.inf)
        ranges = [unbounded if c.codes else (c.valid_range or unbounded) for c in columns]
        width = max((len(c.codes) for c in columns), default=0) or 1
        return cls(
            input_name=input_name,
            columns=columns,
            low=np.asarray([r[0] for r in ranges], dtype=np.float64),
            high=np.asarray([r[1] for r in ranges], dtype=np.float64),
            missing_ok=np.asarray([not c.missing_refusal for c in columns], dtype=np.bool_),
            coded=np.asarray([bool(c.codes) for c in columns], dtype=np.bool_),
            codes=np.asarray([[*c.codes] + [math.nan] * (width - len(c.codes)) for c in columns], dtype=np.float64),
        )

    def check(self, array: npt.NDArray[np.generic]) -> None:
        """Raise :class:`InvalidTensorError` naming the first row, then column, that breaks the contract."""
        if array.dtype.kind not in {"f", "i", "u"}:
            raise InvalidTensorError(f"input {self.input_name!r}: feature values must be numeric")
        if array.shape[1] != len(self.columns):
            raise InvalidTensorError(
                f"input {self.input_name!r}: {array.shape[1]} columns, the model declares {len(self.columns)} features"
            )
        # Bounds and codes in the tensor's own precision: a value the FHIR path accepted in
        # float64 still passes after its cast to float32 (rounding keeps the order).
        dtype = array.dtype if array.dtype.kind == "f" else np.dtype(np.float64)
        values = array.astype(dtype, copy=False)
        with np.errstate(invalid="ignore"):
            bad = (values < self.low.astype(dtype)) | (values > self.high.astype(dtype))  # False for NaN
            bad |= self.coded & ~(values[:, :, np.newaxis] == self.codes.astype(dtype)).any(axis=2)
            if dtype.kind == "f":
                bad |= np.isinf(values) | (np.isnan(values) & ~self.missing_ok)
                bad &= ~(np.isnan(values) & self.missing_ok)  # an accepted NaN is no code either
        if not bad.any():
            return
        row, column = divmod(int(np.argmax(bad)), len(self.columns))
        rule = self.columns[column]
        raise InvalidTensorError(
            f"input {self.input_name!r}, row {row}, column {rule.index} ({rule.name}): "
            f"{rule.reason(float(values[row, column]))}"
        )


def parse_feature_contract(spec: ModelSpec) -> FeatureContract | None:
    """The contract ``spec`` declares, or None if it declares no ``[[preprocessing.features]]``.

    Raises :class:`ModelSpecError` if the declaration cannot be applied to the model's input:
    call it when a model is loaded so that a bad contract refuses the version, not a request.
    """
    preprocessing = spec.preprocessing
    if not preprocessing.get("features"):
        return None
    try:
        declared = _DeclaredContract.model_validate(dict(preprocessing))
    except ValidationError as exc:
        problems = "; ".join(".".join(str(p) for p in err["loc"]) + f": {err['msg']}" for err in exc.errors()[:3])
        raise ModelSpecError(
            f"{spec.name}: preprocessing does not declare a usable feature contract ({problems})"
        ) from exc
    _check_declaration(spec, declared)
    (tensor,) = spec.inputs
    imputes = declared.missing_policy == "impute"
    if not tensor.allow_non_finite:
        not_imputed = "NaN (missing) is not accepted by this input"
    elif not imputes:
        not_imputed = "NaN (missing) is not accepted: the model does not impute missing features"
    else:
        not_imputed = ""
    columns = tuple(
        ColumnRule(
            index=f.index,
            name=f.name,
            valid_range=f.valid_range,
            codes=tuple(sorted(set(f.codes.values()))),
            missing_refusal=not_imputed
            or ("NaN (missing) is not accepted: the feature is required" if f.name in declared.required else ""),
        )
        for f in sorted(declared.features, key=lambda f: f.index)
    )
    return FeatureContract.of(tensor.name, columns)


def _check_declaration(spec: ModelSpec, declared: _DeclaredContract) -> None:
    """Refuse a contract that cannot be applied to the model's input as declared."""
    where = f"{spec.name}: preprocessing.features"
    if len(spec.inputs) != 1 or len(spec.inputs[0].shape) != _FEATURE_RANK:
        raise ModelSpecError(f"{where}: the model must take exactly one input of shape [batch, features]")
    (tensor,) = spec.inputs
    if tensor.datatype in {"BOOL", "BYTES"}:
        raise ModelSpecError(f"{where}: input {tensor.name!r} must be numeric, not {tensor.datatype}")
    names = [f.name for f in declared.features]
    indices = sorted(f.index for f in declared.features)
    if len(set(names)) != len(names) or indices != list(range(len(indices))):
        raise ModelSpecError(f"{where}: names must be unique and indices must be 0..{len(indices) - 1}")
    width = tensor.shape[1]
    if width not in (-1, len(indices)):
        raise ModelSpecError(f"{where}: {len(indices)} features for an input of width {width}")
    by_index = tuple(f.name for f in sorted(declared.features, key=lambda f: f.index))
    if declared.feature_order is not None and declared.feature_order != by_index:
        raise ModelSpecError(f"{where}: feature_order disagrees with the features' indices")
    unknown = sorted(set(declared.required) - set(names))
    if unknown:
        raise ModelSpecError(f"{spec.name}: preprocessing.required names undeclared features {unknown}")
    for feature in declared.features:
        if feature.valid_range is not None and not feature.valid_range[0] <= feature.valid_range[1]:
            raise ModelSpecError(f"{where}: {feature.name}: valid_range low is above high")
        if not all(math.isfinite(v) for v in (*(feature.valid_range or ()), *feature.codes.values())):
            raise ModelSpecError(f"{where}: {feature.name}: valid_range and codes must be finite numbers")


#: Contracts by spec identity. A ModelSpec is frozen but not hashable (its preprocessing is a
#: dict), so the cache holds the spec itself beside its contract: while an entry lives, its id
#: cannot be reused by another object. Bounded, oldest dropped first (reloads make new specs).
_CONTRACTS: dict[int, tuple[ModelSpec, FeatureContract | None]] = {}
_CONTRACTS_MAX: Final = 64
_CONTRACTS_LOCK = threading.Lock()


def feature_contract(spec: ModelSpec) -> FeatureContract | None:
    """:func:`parse_feature_contract`, parsed once per spec object."""
    cached = _CONTRACTS.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    contract = parse_feature_contract(spec)
    with _CONTRACTS_LOCK:
        while len(_CONTRACTS) >= _CONTRACTS_MAX:
            del _CONTRACTS[next(iter(_CONTRACTS))]
        _CONTRACTS[id(spec)] = (spec, contract)
    return contract
