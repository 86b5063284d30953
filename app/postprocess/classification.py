"""Model probabilities -> a decision at the model's operating point."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from app.errors import InvalidRequestError
from app.inference.spec import ModelSpec
from app.postprocess.ood import INDETERMINATE, OodAssessment


@dataclass(frozen=True, slots=True)
class Classification:
    """A decision, or none: ``label`` is ``"indeterminate"`` and ``positive`` None when the input
    lay outside the model's validated input (``ood`` says why)."""

    probabilities: dict[str, float]
    label: str
    positive_label: str | None
    positive: bool | None
    threshold: float | None
    operating_point: str | None
    ood: OodAssessment | None = None

    @property
    def indeterminate(self) -> bool:
        return self.ood is not None and self.ood.outside


def classify(
    spec: ModelSpec,
    probabilities: Sequence[float],
    operating_point: str | None = None,
    ood: OodAssessment | None = None,
) -> Classification:
    """Threshold the positive label's probability at the chosen operating point (default: the
    model's default threshold); models without a positive label take the most probable class.

    An input the detector put outside the validated input gets no label: the probabilities are
    kept for the record, the decision is "indeterminate"."""
    decided = _decide(spec, probabilities, operating_point)
    if ood is None:
        return decided
    if not ood.outside:
        return replace(decided, ood=ood)
    return replace(decided, label=INDETERMINATE, positive=None, ood=ood)


def _decide(spec: ModelSpec, probabilities: Sequence[float], operating_point: str | None) -> Classification:
    if len(probabilities) != len(spec.labels):
        msg = f"{spec.name}: {len(probabilities)} probabilities for {len(spec.labels)} labels"
        raise ValueError(msg)
    by_label = {label: float(p) for label, p in zip(spec.labels, probabilities, strict=True)}
    if spec.positive_label is None or spec.thresholds is None:
        if operating_point is not None:
            raise InvalidRequestError(f"{spec.name} has no operating points")
        label = max(by_label, key=by_label.__getitem__)
        return Classification(by_label, label, None, None, None, None)
    if operating_point is None or operating_point == "default":
        threshold, name = spec.thresholds.default, "default"
    elif operating_point in spec.thresholds.operating_points:
        threshold, name = spec.thresholds.operating_points[operating_point].threshold, operating_point
    else:
        known = ", ".join(["default", *spec.thresholds.operating_points])
        raise InvalidRequestError(f"unknown operating point {operating_point!r}; {spec.name} has: {known}")
    positive = by_label[spec.positive_label] >= threshold
    negatives = [label for label in spec.labels if label != spec.positive_label]
    label = spec.positive_label if positive else max(negatives, key=by_label.__getitem__)
    return Classification(by_label, label, spec.positive_label, positive, threshold, name)


def suspicion(decision: Classification) -> float:
    """How suspicious a decision is: its positive label's probability (else its top one). A study
    takes the decision of its most suspicious image, and its confirmed outcome judges that one."""
    if decision.positive_label is not None:
        return decision.probabilities[decision.positive_label]
    return max(decision.probabilities.values())
