"""Outcome feedback: confirmed findings for results, and the running performance they reveal.

A clinician or the HIS names a result by its request id and says whether the confirmed finding
agrees with it. The result itself is read back from its inference audit event (request ids are
kept there in clear; identifiers of patients and studies are pseudonyms and are not needed), so
nobody can "confirm" a prediction that was never made, and the stored record copies nothing the
caller could have invented. From the stored outcomes the service computes, per model version,
sensitivity and specificity with Wilson 95 % intervals and the expected calibration error, and
sets the ``medinfer_confirmed_*`` gauges that the alert compares with the operating point's
claimed sensitivity less the margin the model declares (post-market surveillance, EU MDR
Art. 83-86).

Decisions documented in ``docs/feedback.md``:

- A result that failed or was indeterminate (outside the validated input) cannot be judged: no
  label was given, so there is nothing to agree or disagree with. Such feedback is refused (409
  ``feedback-conflict``) rather than stored and left out of the figures, so that every stored row
  counts.
- A request id that names inferences of more than one model version (a caller reused its
  ``X-Request-ID``) is ambiguous and refused the same way.
- Sensitivity and specificity "as decided" count each result at the operating point it was
  decided at. The per-operating-point figures re-threshold the stored probability at each
  declared threshold, so that each can be compared with its own claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit.recorder import AuditWriter
from app.container import Container
from app.domain import AuditRecord, RequestContext
from app.errors import (
    AuditUnavailableError,
    DatabaseUnavailableError,
    FeedbackConflictError,
    InvalidRequestError,
    MedinferError,
    ModelNotFoundError,
    ResultNotFoundError,
)
from app.inference.registry import ModelRegistry
from app.inference.spec import DataSplit, ModelSpec, load_spec
from app.observability.metrics import Metrics
from app.postprocess.classification import classify, suspicion
from app.tables import AuditEvent, OutcomeFeedback

log = logging.getLogger(__name__)

Verdict = Literal["agree", "disagree", "label"]

#: z for a two-sided 95 % interval.
Z95 = 1.959963984540054
#: Equal-width probability bins of the expected calibration error.
CALIBRATION_BINS = 10


class Reason(enum.StrEnum):
    """How the outcome was confirmed: a closed vocabulary, so no free text (which could hold
    PHI) is ever stored."""

    PATHOLOGY = "pathology"
    ANGIOGRAPHY = "angiography"
    IMAGING_FOLLOW_UP = "imaging_follow_up"
    CLINICAL_FOLLOW_UP = "clinical_follow_up"
    LABORATORY = "laboratory"
    EXPERT_REVIEW = "expert_review"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the caller says about one result. ``model``, if given, must be the result's model."""

    request_id: str
    verdict: Verdict
    confirmed_label: str | None = None
    reason: Reason | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One stored outcome, as the API returns it (no PHI: label names, numbers, a client id)."""

    request_id: str
    model: str
    version: str
    model_sha256: str
    probability: float | None
    decided_label: str
    threshold: float | None
    operating_point: str | None
    confirmed_label: str
    verdict: Verdict
    reason: Reason | None
    recorded_by: str
    recorded_at: datetime

    @classmethod
    def of(cls, row: OutcomeFeedback) -> FeedbackRecord:
        return cls(
            request_id=row.request_id,
            model=row.model,
            version=row.version,
            model_sha256=row.model_sha256,
            probability=row.probability,
            decided_label=row.decided_label,
            threshold=row.threshold,
            operating_point=row.operating_point,
            confirmed_label=row.confirmed_label,
            verdict=row.verdict,  # type: ignore[arg-type]  # written from Verdict only
            reason=Reason(row.reason) if row.reason else None,
            recorded_by=row.recorded_by,
            recorded_at=row.recorded_at if row.recorded_at.tzinfo else row.recorded_at.replace(tzinfo=UTC),
        )


@dataclass(frozen=True, slots=True)
class Interval:
    """A proportion with its Wilson score 95 % interval (sound for small counts and 0 or 1)."""

    value: float
    low: float
    high: float
    successes: int
    total: int


def wilson(successes: int, total: int, z: float = Z95) -> Interval | None:
    """Wilson score interval (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over Wald)."""
    if total == 0:
        return None
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), successes, total)


def expected_calibration_error(pairs: Sequence[tuple[float, bool]], bins: int = CALIBRATION_BINS) -> float | None:
    """ECE over equal-width bins: sum over bins of (share of cases) x |mean probability - observed
    rate| (Naeini et al. 2015). ``pairs`` are (positive label's probability, confirmed positive)."""
    if not pairs:
        return None
    totals = [0] * bins
    probability_sums = [0.0] * bins
    positives = [0] * bins
    for probability, positive in pairs:
        index = min(bins - 1, max(0, int(probability * bins)))
        totals[index] += 1
        probability_sums[index] += probability
        positives[index] += positive
    n = len(pairs)
    return sum(
        totals[i] / n * abs(probability_sums[i] / totals[i] - positives[i] / totals[i])
        for i in range(bins)
        if totals[i]
    )


@dataclass(frozen=True, slots=True)
class Confusion:
    true_positive: int = 0
    false_negative: int = 0
    true_negative: int = 0
    false_positive: int = 0

    @property
    def sensitivity(self) -> Interval | None:
        return wilson(self.true_positive, self.true_positive + self.false_negative)

    @property
    def specificity(self) -> Interval | None:
        return wilson(self.true_negative, self.true_negative + self.false_positive)


def confusion(pairs: Iterable[tuple[bool, bool]]) -> Confusion:
    """(decided positive, confirmed positive) pairs -> the 2x2 table."""
    tp = fn = tn = fp = 0
    for decided, confirmed in pairs:
        if confirmed:
            tp, fn = (tp + 1, fn) if decided else (tp, fn + 1)
        else:
            fp, tn = (fp + 1, tn) if decided else (fp, tn + 1)
    return Confusion(tp, fn, tn, fp)


@dataclass(frozen=True, slots=True)
class OperatingPointCheck:
    """One declared operating point: its claim from ``model.toml`` beside what the confirmed
    cases show when their stored probability is thresholded at it."""

    name: str
    threshold: float
    claimed_sensitivity: float | None
    claimed_specificity: float | None
    split: DataSplit | None
    sensitivity_floor: float | None
    confusion: Confusion


@dataclass(frozen=True, slots=True)
class VersionPerformance:
    """Confirmed cases of one version. ``confusion`` counts each result as it was decided;
    ``monitored`` is the operating point whose threshold is the model's default (the one the
    alert watches), ``below_floor`` whether the confirmed sensitivity fell under its floor."""

    version: str
    confirmed: int
    by_label: Mapping[str, int]
    confusion: Confusion
    calibration_error: float | None
    monitored: OperatingPointCheck | None
    operating_points: tuple[OperatingPointCheck, ...]

    @property
    def below_floor(self) -> bool | None:
        sensitivity = self.confusion.sensitivity
        if self.monitored is None or self.monitored.sensitivity_floor is None or sensitivity is None:
            return None
        return sensitivity.value < self.monitored.sensitivity_floor


@dataclass(frozen=True, slots=True)
class ModelPerformance:
    model: str
    positive_label: str | None
    sensitivity_margin: float
    versions: tuple[VersionPerformance, ...]


def sensitivity_margin(spec: ModelSpec) -> float:
    """The margin below the claimed sensitivity that the model tolerates before the alert
    (``[monitoring] sensitivity_margin`` in model.toml)."""
    return spec.monitoring.sensitivity_margin


def _checks(
    spec: ModelSpec, rows: Sequence[_Row]
) -> tuple[tuple[OperatingPointCheck, ...], OperatingPointCheck | None]:
    if spec.thresholds is None or spec.positive_label is None:
        return (), None
    margin = sensitivity_margin(spec)
    scored = [(r.probability, r.confirmed_label == spec.positive_label) for r in rows if r.probability is not None]
    checks = []
    monitored = None
    for name, point in spec.thresholds.operating_points.items():
        check = OperatingPointCheck(
            name=name,
            threshold=point.threshold,
            claimed_sensitivity=point.sensitivity,
            claimed_specificity=point.specificity,
            split=point.split,
            sensitivity_floor=None if point.sensitivity is None else max(0.0, point.sensitivity - margin),
            confusion=confusion((p >= point.threshold, positive) for p, positive in scored),
        )
        checks.append(check)
        if monitored is None and math.isclose(point.threshold, spec.thresholds.default):
            monitored = check
    return tuple(checks), monitored


@dataclass(frozen=True, slots=True)
class _Row:
    version: str
    probability: float | None
    decided_label: str
    confirmed_label: str


def performance_of(spec: ModelSpec, rows: Sequence[_Row], versions: Iterable[str] = ()) -> ModelPerformance:
    """The figures of every version that has confirmed cases (or is named in ``versions``)."""
    by_version: dict[str, list[_Row]] = {v: [] for v in versions}
    for row in rows:
        by_version.setdefault(row.version, []).append(row)
    out = []
    for version in sorted(by_version, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v)):
        cases = by_version[version]
        counts = dict.fromkeys(spec.labels, 0)
        for row in cases:
            counts[row.confirmed_label] = counts.get(row.confirmed_label, 0) + 1
        positive = spec.positive_label
        table = (
            confusion((r.decided_label == positive, r.confirmed_label == positive) for r in cases)
            if positive is not None
            else Confusion()
        )
        pairs = [(r.probability, r.confirmed_label == positive) for r in cases if r.probability is not None]
        checks, monitored = _checks(spec, cases)
        out.append(
            VersionPerformance(
                version=version,
                confirmed=len(cases),
                by_label=counts,
                confusion=table,
                calibration_error=expected_calibration_error(pairs) if positive is not None else None,
                monitored=monitored,
                operating_points=checks,
            )
        )
    return ModelPerformance(spec.name, spec.positive_label, sensitivity_margin(spec), tuple(out))


@dataclass(frozen=True, slots=True)
class _Result:
    """What the audit trail says one request's inference produced."""

    audit_seq: int
    model: str
    version: str
    sha256: str
    probabilities: list[float]
    decided_label: str | None
    threshold: float | None
    operating_point: str | None


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class FeedbackService:
    """Records outcomes and keeps the confirmed-performance gauges current.

    Every replica refreshes the gauges from the database every ``refresh_interval_s`` (and after
    each outcome it records), so all replicas report the same database-wide figures and a
    ``max`` across them is the current value, not a stale one.
    """

    sessionmaker: async_sessionmaker[AsyncSession]
    audit: AuditWriter | None
    registry: ModelRegistry
    metrics: Metrics
    clock: Callable[[], datetime] = _utcnow
    refresh_interval_s: float = 60.0
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def record(self, outcome: Outcome, context: RequestContext) -> FeedbackRecord:
        """Store one confirmed outcome for the result ``outcome.request_id`` names, audited.

        Raises :class:`ResultNotFoundError` (no such inference, or of another model),
        :class:`FeedbackConflictError` (already recorded; the inference failed, was
        indeterminate or is ambiguous), :class:`InvalidRequestError` (a label the model does
        not have, or a verdict that contradicts it), :class:`AuditUnavailableError`.
        """
        model = outcome.model
        try:
            result = await self._result(outcome)
            model = result.model
            spec = self.spec(result.model)
            row = self._row(outcome, result, spec, context)
            await self._store(row)
        except MedinferError as exc:
            if not isinstance(exc, AuditUnavailableError):
                await self._audit_refusal(context, model, exc)
            raise
        try:
            await self._audit(
                AuditRecord(
                    action="feedback",
                    outcome="success",
                    request_id=context.request_id,
                    actor=context.actor,
                    source_ip=context.source_ip,
                    model=row.model,
                    model_version=row.version,
                    model_sha256=row.model_sha256,
                    detail={
                        "result_request_id": row.request_id,
                        "result_audit_seq": row.audit_seq,
                        "verdict": row.verdict,
                        "decided_label": row.decided_label,
                        "confirmed_label": row.confirmed_label,
                        "reason": row.reason,
                    },
                )
            )
        except AuditUnavailableError:
            await self._take_back(row.request_id)
            raise
        self.metrics.feedback.labels(model=row.model, version=row.version, verdict=row.verdict).inc()
        with contextlib.suppress(SQLAlchemyError):  # the next periodic refresh catches up
            self._publish(await self.performance(row.model))
        return FeedbackRecord.of(row)

    def spec(self, name: str) -> ModelSpec:
        """The model's spec: the loaded one, else (a model no longer served still has outcomes
        to report) its ``model.toml`` in the repository."""
        for spec in self.registry.specs():
            if spec.name == name:
                return spec
        model_dir = self.registry.repository / name
        if name.startswith(".") or "/" in name or not (model_dir / "model.toml").is_file():
            raise ModelNotFoundError(f"model {name!r} is not in the repository")
        return load_spec(model_dir)

    async def performance(self, model: str) -> ModelPerformance:
        """Per version: confirmed cases, the 2x2 table as decided, sensitivity and specificity
        with Wilson 95 % intervals, ECE, and each operating point's claim against the cases."""
        spec = self.spec(model)
        query = select(
            OutcomeFeedback.version,
            OutcomeFeedback.probability,
            OutcomeFeedback.decided_label,
            OutcomeFeedback.confirmed_label,
        ).where(OutcomeFeedback.model == model)
        try:
            async with self.sessionmaker() as session:
                rows = [_Row(*r) for r in (await session.execute(query)).all()]
        except SQLAlchemyError as exc:
            raise DatabaseUnavailableError("outcome store unavailable", retry_after_s=2) from exc
        return performance_of(spec, rows, spec.served_versions())

    async def refresh(self) -> None:
        """Set the gauges of every loaded model from the database (one pass)."""
        for spec in self.registry.specs():
            self._publish(await self.performance(spec.name))

    async def start(self) -> None:
        """Refresh the gauges once the repository is loaded, then every ``refresh_interval_s``."""
        self._task = asyncio.create_task(self._refresh_forever(), name="feedback-refresh")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_forever(self) -> None:
        while True:
            loaded = self.registry.initial_load_done  # until then, refresh soon: models are arriving
            try:
                await self.refresh()
            except MedinferError as exc:
                log.warning("performance refresh failed", extra={"event": "feedback.refresh_failed", "code": exc.code})
            await asyncio.sleep(self.refresh_interval_s if loaded else 0.5)

    def _publish(self, performance: ModelPerformance) -> None:
        m = self.metrics
        for v in performance.versions:
            labels = {"model": performance.model, "version": v.version}
            for label, count in v.by_label.items():
                m.confirmed_cases.labels(**labels, label=label).set(count)
            if (sensitivity := v.confusion.sensitivity) is not None:
                m.confirmed_sensitivity.labels(**labels).set(sensitivity.value)
            if (specificity := v.confusion.specificity) is not None:
                m.confirmed_specificity.labels(**labels).set(specificity.value)
            if v.calibration_error is not None:
                m.calibration_error.labels(**labels).set(v.calibration_error)
            if v.monitored is not None and v.monitored.sensitivity_floor is not None:
                m.sensitivity_floor.labels(**labels).set(v.monitored.sensitivity_floor)

    async def _result(self, outcome: Outcome) -> _Result:
        """The result as its inference audit events recorded it (a study in several batches has
        several events under one request id; its decision is that of its most suspicious image)."""
        query = (
            select(AuditEvent)
            .where(AuditEvent.request_id == outcome.request_id, AuditEvent.action == "inference")
            .order_by(AuditEvent.seq)
        )
        existing = select(OutcomeFeedback.id).where(OutcomeFeedback.request_id == outcome.request_id)
        try:
            async with self.sessionmaker() as session:
                events = (await session.scalars(query)).all()
                already = await session.scalar(existing)
        except SQLAlchemyError as exc:
            raise DatabaseUnavailableError("audit trail unavailable", retry_after_s=2) from exc
        if not events:
            raise ResultNotFoundError("no inference result has this request id")
        if outcome.model is not None and any(e.model != outcome.model for e in events):
            raise ResultNotFoundError(f"no inference result of model {outcome.model!r} has this request id")
        if already is not None:
            raise FeedbackConflictError("an outcome is already recorded for this result")
        if any(e.outcome != "success" for e in events):
            raise FeedbackConflictError("this request's inference failed: there is no result to judge")
        versions = {(e.model, e.model_version, e.model_sha256) for e in events}
        if len(versions) > 1:
            raise FeedbackConflictError(
                "this request id names inferences of several model versions; send outcomes for unique request ids"
            )
        ((model, version, sha256),) = versions
        if model is None or version is None or sha256 is None:
            raise FeedbackConflictError("the result's audit event lacks its model provenance")
        details = [json.loads(e.detail) for e in events]
        if any(bool(a.get("outside")) for d in details for a in d.get("ood", ())):
            raise FeedbackConflictError(
                "the result was indeterminate (input outside the validated range): no label to judge"
            )
        return self._most_suspicious(events[0].seq, model, version, sha256, details)

    def _most_suspicious(
        self, seq: int, model: str, version: str, sha256: str, details: Sequence[Mapping[str, Any]]
    ) -> _Result:
        spec = self.spec(model)
        output = spec.outputs[0].name
        rows: list[tuple[list[float], Mapping[str, Any]]] = []
        for detail in details:
            values = detail.get("outputs", {}).get(output)
            if not isinstance(values, list):
                raise FeedbackConflictError("the result's outputs were not audited; it cannot be judged")
            rows.extend((row, detail) for row in (values if values and isinstance(values[0], list) else [values]))
        if not rows or any(len(row) != len(spec.labels) for row, _ in rows):
            raise FeedbackConflictError("the result's audited outputs do not match the model's labels")
        worst, where = max(rows, key=lambda pair: suspicion(classify(spec, pair[0])))
        decision = where.get("decision")
        if not isinstance(decision, dict):
            # Events written before the pipeline audited its decision: the default operating point.
            made = classify(spec, worst)
            decision = {"label": made.label, "threshold": made.threshold, "operating_point": made.operating_point}
        return _Result(
            audit_seq=seq,
            model=model,
            version=version,
            sha256=sha256,
            probabilities=[float(p) for p in worst],
            decided_label=decision.get("label"),
            threshold=decision.get("threshold"),
            operating_point=decision.get("operating_point"),
        )

    def _row(self, outcome: Outcome, result: _Result, spec: ModelSpec, context: RequestContext) -> OutcomeFeedback:
        decided = result.decided_label
        if decided is None or decided not in spec.labels:
            raise FeedbackConflictError("the result carries no label to judge")
        confirmed = _confirmed_label(outcome, decided, spec.labels)
        probability = (
            result.probabilities[spec.labels.index(spec.positive_label)] if spec.positive_label is not None else None
        )
        return OutcomeFeedback(
            request_id=outcome.request_id,
            audit_seq=result.audit_seq,
            model=result.model,
            version=result.version,
            model_sha256=result.sha256,
            probability=probability,
            decided_label=decided,
            threshold=result.threshold,
            operating_point=result.operating_point,
            confirmed_label=confirmed,
            verdict=outcome.verdict,
            reason=outcome.reason.value if outcome.reason else None,
            recorded_by=context.actor or "unknown",
            recorded_at=self.clock(),
        )

    async def _store(self, row: OutcomeFeedback) -> None:
        try:
            async with self.sessionmaker() as session:
                session.add(row)
                await session.commit()
        except IntegrityError as exc:  # a concurrent outcome for the same result won the race
            raise FeedbackConflictError("an outcome is already recorded for this result") from exc
        except SQLAlchemyError as exc:
            raise DatabaseUnavailableError("outcome store unavailable", retry_after_s=2) from exc

    async def _take_back(self, request_id: str) -> None:
        """No audit event, no stored outcome: the row is removed again (fail closed)."""
        try:
            async with self.sessionmaker() as session:
                await session.execute(delete(OutcomeFeedback).where(OutcomeFeedback.request_id == request_id))
                await session.commit()
        except SQLAlchemyError:
            log.exception("unaudited outcome could not be removed", extra={"event": "feedback.take_back_failed"})

    async def _audit(self, record: AuditRecord) -> None:
        if self.audit is not None:
            await self.audit.record(record)

    async def _audit_refusal(self, context: RequestContext, model: str | None, error: MedinferError) -> None:
        record = AuditRecord(
            action="feedback",
            outcome="failure",
            request_id=context.request_id,
            actor=context.actor,
            source_ip=context.source_ip,
            model=model,
            detail={"error_code": error.code},
        )
        try:
            await self._audit(record)
        except AuditUnavailableError:
            log.warning("feedback refusal not audited", extra={"event": "audit.failure_unrecorded", "code": error.code})


def _confirmed_label(outcome: Outcome, decided: str, labels: Sequence[str]) -> str:
    """The confirmed label a verdict implies: ``agree`` keeps the decision, ``disagree`` takes
    the other label of a two-label model (or the one named), ``label`` names it."""
    named = outcome.confirmed_label
    if named is not None and named not in labels:
        raise InvalidRequestError(f"confirmed_label must be one of {', '.join(labels)}")
    if outcome.verdict == "agree":
        if named is not None and named != decided:
            raise InvalidRequestError("verdict 'agree' with a confirmed_label other than the decided one")
        return decided
    if outcome.verdict == "disagree":
        if named is not None:
            if named == decided:
                raise InvalidRequestError("verdict 'disagree' with the decided label as confirmed_label")
            return named
        others = [label for label in labels if label != decided]
        if len(others) != 1:
            raise InvalidRequestError(
                "verdict 'disagree' needs a confirmed_label for a model with more than two labels"
            )
        return others[0]
    if named is None:
        raise InvalidRequestError("verdict 'label' needs a confirmed_label")
    return named


def build_feedback(container: Container) -> FeedbackService:
    """The service from the container's collaborators (called by ``create_app``'s lifespan)."""
    return FeedbackService(container.sessionmaker, container.pipeline.audit, container.registry, container.metrics)
