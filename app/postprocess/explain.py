"""Exact Shapley contributions of a tabular model's inputs to one of its results.

A clinician will not act on a probability they cannot inspect, so a record model can say how
much each input moved its answer away from a reference patient (the ``baseline``, one value per
feature from the training data; ``[explain]`` in ``model.toml``). The attribution is the Shapley
value of the cooperative game ``v(S) = f(x_S, baseline_rest)``: the only split of
``f(x) - f(baseline)`` over the features that is efficient (it sums to that difference), gives
equal shares to features that act alike, and gives nothing to a feature the model ignores
(Shapley 1953; the "interventional" value of Janzing et al. 2020). It is computed over the
model's own graph, not a surrogate, so any tabular ONNX model gets it.

With ``n`` inputs the game has ``2**n`` coalitions. They run as ONE batch through the caller's
``run`` (the version's ONNX Runtime session), so the cost is one large batch rather than
``2**n`` calls; above :data:`MAX_FEATURES` that batch stops being cheap and is refused. A feature
whose value equals its baseline value changes no row, so it is a null player: it gets exactly 0
and is left out of the enumeration (``2**k`` rows for the ``k`` features that differ).

Missing values (NaN). A record model imputes NaN inside its graph, so NaN is passed through as
it is: the feature's contribution is then what the model's own imputation gives against the
baseline. That is what the model actually did with the gap, for any model, including one that
imputes something else than the baseline or treats NaN as information. When the baseline is
the imputation value (the reference model's case), an imputed feature contributes exactly 0:
the answer did not move because of a value nobody measured.

Output space. ``probability``: contributions are shares of ``P(positive) - P(positive | baseline)``.
``log_odds``: of ``logit P(positive)`` (probabilities clipped to ``[LOG_ODDS_EPS, 1 - LOG_ODDS_EPS]``
first, so a saturated output gives a finite answer), where a logistic model is additive and a
contribution reads as an odds ratio ``exp(value)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from app.errors import InferenceFailedError, ModelSpecError

Space = Literal["probability", "log_odds"]
Run = Callable[[npt.NDArray[np.floating]], npt.NDArray[np.floating]]

#: 2**16 rows of a small tabular graph still run in milliseconds; 2**17 and beyond do not.
MAX_FEATURES: Final = 16
#: Probabilities are clipped this far from 0 and 1 before the logit (|log-odds| <= 16.1).
LOG_ODDS_EPS: Final = 1e-7


@dataclass(frozen=True, slots=True)
class Contributions:
    """Per-feature Shapley contributions to one result, in ``space``.

    ``values[i]`` belongs to ``names[i]``, whose input was ``inputs[i]`` (NaN when missing and
    imputed by the model). ``base_value`` is the model's output for the baseline and
    ``output_value`` for the record, both in ``space``; ``sum(values) == output_value -
    base_value`` up to rounding. ``evaluations`` is the number of rows the model ran for it and
    ``method`` how they were combined: ``exact`` (every coalition) or ``additive`` (one row per
    feature, valid only for a model additive in ``space``).
    """

    names: tuple[str, ...]
    values: tuple[float, ...]
    inputs: tuple[float, ...]
    baselines: tuple[float, ...]
    base_value: float
    output_value: float
    space: Space
    method: Literal["exact", "additive"]
    evaluations: int


def baseline_vector(baseline: Mapping[str, float], names: Sequence[str]) -> npt.NDArray[np.float64]:
    """The ``[explain] baseline`` table in feature order.

    Raises :class:`ModelSpecError` when a feature has no finite baseline value: Shapley values
    need a complete reference point, and NaN there would make the reference patient itself an
    imputation.
    """
    missing = [n for n in names if n not in baseline]
    if missing:
        raise ModelSpecError(f"explain.baseline lacks a value for: {', '.join(missing)}")
    extra = sorted(set(baseline) - set(names))
    if extra:
        raise ModelSpecError(f"explain.baseline names features the model does not have: {', '.join(extra)}")
    vector = np.array([baseline[n] for n in names], dtype=np.float64)
    if not np.all(np.isfinite(vector)):
        raise ModelSpecError("explain.baseline values must be finite numbers")
    return vector


def shapley(
    run: Run,
    x: npt.NDArray[np.floating],
    baseline: npt.NDArray[np.floating],
    *,
    positive_index: int,
    space: Space,
    names: Sequence[str] | None = None,
    imputation: npt.NDArray[np.floating] | None = None,
    additive: bool = False,
) -> Contributions:
    """Exact Shapley contributions of each input of ``x`` (one record, ``[n]`` or ``[1, n]``).

    ``run`` maps a ``[rows, n]`` batch (in ``x``'s dtype, as the session expects) to ``[rows,
    labels]`` probabilities; it is called once. ``additive=True`` is for a model that is
    additive in ``space`` (a plain logistic model in ``log_odds``, a linear one in
    ``probability``): then each value is ``f(x_i, baseline_rest) - f(baseline)`` and ``k + 2``
    rows suffice. If the result does not sum to ``f(x) - f(baseline)`` the model is not additive
    after all, and the exact enumeration runs instead (``method`` says which answered).

    ``imputation`` (optional, NaN where the model declares none) is what the model's contract
    says its graph substitutes for a NaN (``[preprocessing] imputation``: "imputing in the
    preprocessor with the same values gives identical results"). A NaN feature is then played
    with that value, which changes no answer but lets a NaN imputed to its baseline value count
    as the null player it is: fewer rows. ``inputs`` still shows the NaN.

    Raises :class:`ModelSpecError` for more than :data:`MAX_FEATURES` inputs or a baseline that
    does not fit, and :class:`InferenceFailedError` when ``run`` answers a batch of the wrong shape.
    """
    record = np.asarray(x)
    if record.shape[:-1] == (1,):
        record = record[0]
    if record.ndim != 1:
        raise ModelSpecError(f"shapley explains one record [n] or [1, n], not shape {tuple(np.shape(x))}")
    n = int(record.shape[0])
    if n > MAX_FEATURES:
        raise ModelSpecError(
            f"exact Shapley values enumerate 2**n coalitions; {n} features is over the limit of {MAX_FEATURES}"
        )
    reference = np.asarray(baseline, dtype=record.dtype)
    if reference.shape != (n,):
        raise ModelSpecError(f"explain.baseline has {reference.size} values for {n} features")
    if not np.all(np.isfinite(reference)):
        raise ModelSpecError("explain.baseline values must be finite numbers")
    labels = tuple(names) if names is not None else tuple(f"feature_{i}" for i in range(n))
    if len(labels) != n:
        raise ModelSpecError(f"{len(labels)} feature names for {n} features")

    played = record
    if imputation is not None:
        substitute = np.asarray(imputation, dtype=record.dtype)
        if substitute.shape != (n,):
            raise ModelSpecError(f"{substitute.size} imputation values for {n} features")
        played = np.where(np.isnan(record) & ~np.isnan(substitute), substitute, record)
    # Equal bits: the feature changes no row, so it is a null player (NaN never equals).
    active = np.flatnonzero(~(played == reference))
    values = np.zeros(n, dtype=np.float64)
    if additive:
        answer = _additive(
            run, record=played, reference=reference, active=active, positive_index=positive_index, space=space
        )
        v_empty, v_full, phi, rows = answer
        if _sums(phi, v_full - v_empty):
            values[active] = phi
            return _result(
                names=labels,
                values=values,
                record=record,
                reference=reference,
                base_value=v_empty,
                output_value=v_full,
                space=space,
                method="additive",
                evaluations=rows,
            )
    v = _values(run, _coalitions(played, reference, active), positive_index, space)
    values[active] = _combine(v, active.size)
    return _result(
        names=labels,
        values=values,
        record=record,
        reference=reference,
        base_value=float(v[0]),
        output_value=float(v[-1]),
        space=space,
        method="exact",
        evaluations=v.size,
    )


def _coalitions(
    record: npt.NDArray[np.floating], reference: npt.NDArray[np.floating], active: npt.NDArray[np.intp]
) -> npt.NDArray[np.floating]:
    """Row ``m`` is the baseline with the active features whose bit is set in ``m`` taken from
    the record: row 0 is the baseline, the last row the record."""
    k = active.size
    batch = np.repeat(reference[None, :], 1 << k, axis=0)
    batch[:, active] = np.where(_tables(k).bits, record[active], reference[active])
    return batch


@dataclass(frozen=True, slots=True)
class _Tables:
    """What enumerating ``k`` players needs, the same for every record: built once per ``k``.

    ``bits[m, j]``: player ``j`` is in coalition ``m``. ``without[t, j]``: the ``t``-th coalition
    lacking ``j`` (a zero bit inserted at ``j``), ``with_[t, j]`` the same plus ``j``, and
    ``weight[t, j] = |S|! (k - |S| - 1)! / k!`` for that coalition ``S``.
    """

    bits: npt.NDArray[np.bool_]
    without: npt.NDArray[np.intp]
    with_: npt.NDArray[np.intp]
    weight: npt.NDArray[np.float64]


@functools.cache
def _tables(k: int) -> _Tables:
    masks = np.arange(1 << k)
    bits = ((masks[:, None] >> np.arange(k)) & 1).astype(bool)
    t = np.arange(1 << max(k - 1, 0))[:, None]
    j = np.arange(k)[None, :]
    without = ((t >> j) << (j + 1)) | (t & ((1 << j) - 1))
    size = bits.sum(axis=1)
    factorial = np.array([math.factorial(s) for s in range(k + 1)], dtype=np.float64)
    per_size = factorial[: max(k, 1)] * factorial[max(k, 1) - 1 :: -1] / factorial[k]
    for array in (bits, without):
        array.setflags(write=False)
    weight = per_size[size[without]]
    weight.setflags(write=False)
    with_ = without | (1 << j)
    with_.setflags(write=False)
    return _Tables(bits=bits, without=without, with_=with_, weight=weight)


def _values(run: Run, batch: npt.NDArray[np.floating], positive_index: int, space: Space) -> npt.NDArray[np.float64]:
    out = np.asarray(run(batch))
    if out.ndim != batch.ndim or out.shape[0] != batch.shape[0] or not 0 <= positive_index < out.shape[1]:
        raise InferenceFailedError(
            f"explanation batch of {batch.shape[0]} rows got output shape {out.shape} "
            f"(positive label at column {positive_index})"
        )
    p = out[:, positive_index].astype(np.float64)
    if space == "probability":
        return p
    p = np.clip(p, LOG_ODDS_EPS, 1.0 - LOG_ODDS_EPS)
    return np.asarray(np.log(p) - np.log1p(-p), dtype=np.float64)


def _combine(v: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.float64]:
    """Shapley values from the ``2**k`` coalition values (index = membership bit mask).

    ``phi_j = sum over S without j of |S|! (k-|S|-1)! / k! * (v(S + j) - v(S))``, for all ``j``
    at once. Differences, not a weighted sum of values, so a null player gets exactly 0.
    """
    if k == 0:
        return np.zeros(0, dtype=np.float64)
    tables = _tables(k)
    gains = v[tables.with_] - v[tables.without]
    return np.asarray(np.einsum("tj,tj->j", tables.weight, gains), dtype=np.float64)


def _additive(
    run: Run,
    *,
    record: npt.NDArray[np.floating],
    reference: npt.NDArray[np.floating],
    active: npt.NDArray[np.intp],
    positive_index: int,
    space: Space,
) -> tuple[float, float, npt.NDArray[np.float64], int]:
    """For an additive model each feature's Shapley value is its effect alone on the baseline."""
    k = active.size
    batch = np.repeat(reference[None, :], k + 2, axis=0)
    batch[1 + np.arange(k), active] = record[active]
    batch[-1] = record
    v = _values(run, batch, positive_index, space)
    return float(v[0]), float(v[-1]), v[1 : k + 1] - v[0], k + 2


def _sums(phi: npt.NDArray[np.float64], total: float) -> bool:
    """Efficiency within float32 output noise: the check that an ``additive`` model is one."""
    return abs(float(phi.sum()) - total) <= 1e-4 * max(1.0, abs(total))


def _result(
    *,
    names: tuple[str, ...],
    values: npt.NDArray[np.float64],
    record: npt.NDArray[np.floating],
    reference: npt.NDArray[np.floating],
    base_value: float,
    output_value: float,
    space: Space,
    method: Literal["exact", "additive"],
    evaluations: int,
) -> Contributions:
    return Contributions(
        names=names,
        values=tuple(values.tolist()),
        inputs=tuple(record.astype(np.float64).tolist()),
        baselines=tuple(reference.astype(np.float64).tolist()),
        base_value=float(base_value),
        output_value=float(output_value),
        space=space,
        method=method,
        evaluations=int(evaluations),
    )
