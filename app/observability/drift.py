"""Is the population a model version sees still the one it was validated on?

Post-market surveillance of a model (EU MDR Art. 83-86) needs a signal before outcomes arrive,
which takes weeks: the distribution of what goes in and what comes out. This module turns each
inferred record into PHI-free Prometheus series per model version:

- ``medinfer_output_probability{label}``: a histogram of every output probability (records and
  images);
- ``medinfer_records_total`` and ``medinfer_features_imputed_total{feature}``: their ratio is the
  imputation rate, which rises when a site stops sending an observation;
- ``medinfer_feature_psi{feature}``: the population stability index of each input feature over
  the last ``window`` records against the training distribution that ``model.toml`` declares
  (``[preprocessing.drift]``, written by the training script). Rule of thumb: below 0.1 stable,
  0.1-0.25 moderate, above 0.25 a major shift.

What lives in memory is the bucket each recent value fell into (a small integer), never the value
itself, and labels carry the model, version, label and feature names only. The PSI of a window is
kept per bucket count, so a record costs one bucket look-up and two count updates per feature; the
gauges are recomputed at most once per ``refresh_s`` (or on :meth:`DriftMonitor.publish`, which a
scrape may call), not on every record.

Bucket convention (the training script computes the reference proportions the same way): with
edges ``e_1 < ... < e_k``, bucket 0 holds ``x <= e_1``, bucket ``i`` holds ``e_i < x <= e_{i+1}``
and bucket ``k`` holds ``x > e_k`` (``bisect_left``, ``numpy.searchsorted(side="left")``). A coded
feature has one bucket per declared code plus one for any other value, whose training share is 0.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from app.errors import ModelSpecError
from app.observability.metrics import Metrics

#: Stands in for an empty bucket's share (in the window or in training), so that the logarithm
#: stays finite: an empty bucket then adds a large but bounded term instead of infinity.
PSI_EPSILON: Final = 1e-4
#: Shares declared in model.toml are rounded; more than this away from 1 is a broken reference.
_SUM_TOLERANCE: Final = 1e-2
_FEATURE_KEYS: Final = frozenset({"edges", "codes", "proportions", "n"})
_DRIFT_KEYS: Final = frozenset({"features", "note"})


def population_stability_index(expected: Sequence[float], counts: Sequence[int]) -> float:
    """PSI = sum over buckets of (a - e) * ln(a / e), a the window's share, e the training share.

    Shares below :data:`PSI_EPSILON` count as it, so that a bucket empty on one side (common with
    a few hundred values over ten buckets) does not make the index infinite. No values: 0.
    """
    total = sum(counts)
    if total <= 0:
        return 0.0
    psi = 0.0
    for share, count in zip(expected, counts, strict=True):
        e = max(share, PSI_EPSILON)
        a = max(count / total, PSI_EPSILON)
        psi += (a - e) * math.log(a / e)
    return psi


@dataclass(frozen=True, slots=True)
class FeatureReference:
    """One input feature's training distribution, as buckets (see the module's convention).

    Numeric features give ``edges`` (the training deciles, duplicates removed) and
    ``len(edges) + 1`` ``proportions``; coded features give ``codes`` and one proportion per code.
    Proportions are the training split's shares with missing values left out (the service leaves
    imputed values out of its window too), and are renormalised here because model.toml rounds
    them. Raises :class:`ModelSpecError` when the reference cannot describe a distribution.
    """

    proportions: tuple[float, ...]
    edges: tuple[float, ...] = ()
    codes: tuple[float, ...] = ()
    #: Training share of every bucket, the "other code" bucket of a coded feature included.
    expected: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _code_index: dict[float, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if bool(self.edges) == bool(self.codes):
            raise ModelSpecError("a drift reference gives either bucket edges or codes")
        values = self.edges or self.codes
        if not all(math.isfinite(v) for v in (*values, *self.proportions)):
            raise ModelSpecError("a drift reference holds only finite numbers")
        wanted = len(self.edges) + 1 if self.edges else len(self.codes)
        if len(self.proportions) != wanted:
            raise ModelSpecError(f"a drift reference needs {wanted} proportions, one per bucket")
        if any(p < 0 for p in self.proportions) or abs(sum(self.proportions) - 1.0) > _SUM_TOLERANCE:
            raise ModelSpecError("drift proportions must be non-negative and sum to 1")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ModelSpecError("drift bucket edges must increase strictly")
        if len(set(self.codes)) != len(self.codes):
            raise ModelSpecError("drift codes must be unique")
        total = sum(self.proportions)
        shares = tuple(p / total for p in self.proportions)
        object.__setattr__(self, "expected", (*shares, 0.0) if self.codes else shares)
        object.__setattr__(self, "_code_index", {code: i for i, code in enumerate(self.codes)})

    @property
    def buckets(self) -> int:
        return len(self.expected)

    def bucket(self, value: float) -> int:
        """The bucket a value falls into; an undeclared code falls into the last ("other")."""
        if self.edges:
            return bisect_left(self.edges, value)
        return self._code_index.get(value, len(self.codes))


def references_from_preprocessing(preprocessing: Mapping[str, Any]) -> dict[str, FeatureReference]:
    """Parse ``[preprocessing.drift.features.NAME]`` of a model.toml into references by feature.

    A model without the table has no input drift reference (its outputs are still watched).
    Lives under ``preprocessing`` because ``ModelSpec`` refuses unknown top-level keys and
    ``preprocessing`` is the model's free-form table; any malformed entry raises
    :class:`ModelSpecError` naming the feature, so a broken reference refuses the version at load
    instead of publishing meaningless indices.
    """
    drift = preprocessing.get("drift")
    if drift is None:
        return {}
    if not isinstance(drift, Mapping) or not isinstance(drift.get("features"), Mapping):
        raise ModelSpecError("[preprocessing.drift] needs a table 'features' of per-feature references")
    unknown = set(drift) - _DRIFT_KEYS
    if unknown:
        raise ModelSpecError(f"[preprocessing.drift]: unknown keys {sorted(unknown)}")
    order = preprocessing.get("feature_order")
    references: dict[str, FeatureReference] = {}
    for name, table in drift["features"].items():
        where = f"[preprocessing.drift.features.{name}]"
        if order is not None and name not in order:
            raise ModelSpecError(f"{where}: not a feature of the model (feature_order)")
        if not isinstance(table, Mapping) or set(table) - _FEATURE_KEYS:
            raise ModelSpecError(f"{where}: a table of {sorted(_FEATURE_KEYS)}")
        try:
            references[name] = FeatureReference(
                proportions=tuple(float(p) for p in table["proportions"]),
                edges=tuple(float(e) for e in table.get("edges", ())),
                codes=tuple(float(c) for c in table.get("codes", ())),
            )
        except ModelSpecError as exc:
            raise ModelSpecError(f"{where}: {exc.detail}") from None
        except (KeyError, TypeError, ValueError):
            raise ModelSpecError(f"{where}: 'proportions' and 'edges' or 'codes' must be lists of numbers") from None
    return references


class _FeatureWindow:
    """The buckets of a feature's last ``size`` values, and how many fall in each bucket."""

    __slots__ = ("counts", "filled", "position", "reference", "ring")

    def __init__(self, reference: FeatureReference, size: int) -> None:
        self.reference = reference
        self.ring = [0] * size
        self.counts = [0] * reference.buckets
        self.filled = 0
        self.position = 0

    def push(self, value: float) -> None:
        bucket = self.reference.bucket(value)
        ring = self.ring
        if self.filled == len(ring):
            self.counts[ring[self.position]] -= 1
        else:
            self.filled += 1
        ring[self.position] = bucket
        self.counts[bucket] += 1
        self.position = (self.position + 1) % len(ring)

    def psi(self) -> float:
        return population_stability_index(self.reference.expected, self.counts)


class _VersionState:
    """One registered version: a window per referenced feature, and when its gauges were set."""

    __slots__ = ("dirty", "features", "lock", "plans", "published_at", "references")

    def __init__(self, reference: Mapping[str, FeatureReference], size: int, now: float) -> None:
        self.references = dict(reference)
        self.features = {name: _FeatureWindow(ref, size) for name, ref in reference.items()}
        self.lock = threading.Lock()
        #: Feature order of a call (a tuple of names) -> [(position, name, window)], computed once.
        self.plans: dict[tuple[str, ...], list[tuple[int, str, _FeatureWindow]]] = {}
        self.published_at = now
        self.dirty = False

    def plan(self, names: Sequence[str]) -> list[tuple[int, str, _FeatureWindow]]:
        key = tuple(names)
        plan = self.plans.get(key)
        if plan is None:
            plan = [(i, n, self.features[n]) for i, n in enumerate(key) if n in self.features]
            self.plans[key] = plan
        return plan


class DriftMonitor:
    """Drift and imputation metrics of every served model version, fed by the pipeline.

    ``window``: how many recent values of each feature the PSI is computed over (per process;
    with several workers the gauge's ``livemax`` shows the worst). ``min_samples``: no PSI is
    published for a feature before its window holds this many values: with ten buckets, a
    no-shift window of n values has an expected PSI near 9/n, so an index over 50 values would be
    noise, and an alert on it a false alarm after every restart. ``refresh_s``: the gauges are
    recomputed at most this often, on the next record or on :meth:`publish`.
    ``clock`` is injected so that tests decide when a refresh is due.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        window: int = 500,
        min_samples: int = 200,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1:
            raise ValueError("window must hold at least one value")
        self._metrics = metrics
        self._window = window
        self._min_samples = max(1, min(min_samples, window))
        self._refresh_s = refresh_s
        self._clock = clock
        self._versions: dict[tuple[str, str], _VersionState] = {}
        # prometheus_client's labels() takes a lock and builds a key on every call: the children
        # are looked up once per (model, version, ...) and kept.
        self._records: dict[tuple[str, str], Any] = {}
        self._imputed: dict[tuple[str, str, str], Any] = {}
        self._probability: dict[tuple[str, str, str], Any] = {}

    def register(self, model: str, version: str, reference: Mapping[str, FeatureReference]) -> None:
        """Start (or restart, emptying the windows) watching a version's inputs against ``reference``.

        A version registered without references (an imaging model) still gets its output histogram.
        """
        self.forget(model, version)
        self._versions[(model, version)] = _VersionState(reference, self._window, self._clock())

    def sync(self, served: Iterable[tuple[str, str, Mapping[str, FeatureReference]]]) -> None:
        """Watch exactly the versions given as (model, version, references), e.g. after every load
        or unload of the model registry: new versions are registered, versions no longer served are
        forgotten, and a version whose reference is unchanged keeps its windows."""
        wanted = {(model, version): dict(references) for model, version, references in served}
        for key in set(self._versions) - set(wanted):
            self.forget(*key)
        for (model, version), references in wanted.items():
            state = self._versions.get((model, version))
            if state is None or state.references != references:
                self.register(model, version, references)

    def forget(self, model: str, version: str) -> None:
        """Stop watching a retired version and drop its PSI series, which would otherwise stay frozen
        at their last value (and keep an alert firing) for a version that no longer serves."""
        state = self._versions.pop((model, version), None)
        if state is None:
            return
        for name in state.features:
            try:
                self._metrics.feature_psi.remove(model, version, name)
            except KeyError:
                continue

    def observe_record(
        self,
        model: str,
        version: str,
        *,
        names: Sequence[str],
        values: Sequence[float],
        imputed: Sequence[str],
        probabilities: Mapping[str, float],
    ) -> None:
        """Count one inferred record: imputed features, output probabilities, feature windows.

        ``values`` are what the model received, in ``names`` order; an imputed feature's value (the
        imputation constant or NaN) stays out of its window, or a site that stopped sending a value
        would read as a population piling up on the median. Non-finite values stay out likewise.
        """
        key = (model, version)
        records = self._records.get(key)
        if records is None:
            records = self._records.setdefault(key, self._metrics.records.labels(model, version))
        records.inc()
        for feature in imputed:
            self._imputed_child(model, version, feature).inc()
        self.observe_image(model, version, probabilities)
        state = self._versions.get(key)
        if state is None:
            return
        skip = set(imputed)
        with state.lock:
            for position, name, window in state.plan(names):
                if name in skip:
                    continue
                value = values[position]
                if math.isfinite(value):
                    window.push(value)
            state.dirty = True
            now = self._clock()
            if now - state.published_at >= self._refresh_s:
                self._publish(model, version, state, now)

    def observe_image(self, model: str, version: str, probabilities: Mapping[str, float]) -> None:
        """Count one output's probabilities in the version's histogram (images have no features)."""
        for label, probability in probabilities.items():
            key = (model, version, label)
            child = self._probability.get(key)
            if child is None:
                child = self._probability.setdefault(key, self._metrics.output_probability.labels(*key))
            child.observe(probability)

    def publish(self) -> None:
        """Set every version's PSI gauges from its current windows now (a scrape may call this)."""
        now = self._clock()
        for (model, version), state in list(self._versions.items()):
            with state.lock:
                self._publish(model, version, state, now)

    def psi(self, model: str, version: str) -> dict[str, float]:
        """The current index of every feature whose window holds at least ``min_samples`` values."""
        state = self._versions.get((model, version))
        if state is None:
            return {}
        with state.lock:
            return {name: window.psi() for name, window in state.features.items() if window.filled >= self._min_samples}

    def _publish(self, model: str, version: str, state: _VersionState, now: float) -> None:
        state.published_at = now
        if not state.dirty:
            return
        state.dirty = False
        for name, window in state.features.items():
            if window.filled >= self._min_samples:
                self._metrics.feature_psi.labels(model, version, name).set(window.psi())

    def _imputed_child(self, model: str, version: str, feature: str) -> Any:
        key = (model, version, feature)
        child = self._imputed.get(key)
        if child is None:
            child = self._imputed.setdefault(key, self._metrics.features_imputed.labels(*key))
        return child
