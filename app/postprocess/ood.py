"""Is this input inside what the model was validated on? If not, no label is decided.

A model trained on phantoms has never seen a real radiograph; a risk score fitted on one
population has never seen a value far outside it. Its probability for such input is a number,
not evidence, so the answer is "indeterminate" with the reasons and the score. What a version
checks is declared in ``[versions.N.ood]`` of its ``model.toml`` (:class:`OodSpec`): for images
a score the graph computes from its own representation plus cheap content checks on the
preprocessed pixels; for records each feature against its training range and a cap on imputed
features.

Reasons never carry a patient's value: they name the check, the feature and the declared limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from app.inference.spec import ContentChecks, OodSpec

INDETERMINATE: Final = "indeterminate"
OUTSIDE: Final = "indeterminate: outside the model's validated input"
#: A pixel this close to the ends of the [0, 1] input range counts as saturated.
_SATURATION_EPS: Final = 1e-6


class OodReason(StrEnum):
    """Why an input is outside; also the ``reason`` label of ``medinfer_indeterminate_total``."""

    OOD_SCORE = "ood_score"
    CONTENT = "content"
    FEATURE_RANGE = "feature_range"
    IMPUTED = "imputed"


@dataclass(frozen=True, slots=True)
class OodFinding:
    reason: OodReason
    text: str


@dataclass(frozen=True, slots=True)
class OodAssessment:
    """The verdict of one version's detector on one input (an image or a record).

    ``score`` and ``threshold`` are the detector's own: a distance for images; for records the
    number of departures from the validated input (threshold 0): each feature outside its
    training range, and each imputed feature beyond the cap. A record's score is a count on
    purpose: a distance would let anyone who knows the range work the patient's value back out of
    the audit trail.
    """

    method: str
    score: float | None
    threshold: float | None
    findings: tuple[OodFinding, ...] = ()

    @property
    def outside(self) -> bool:
        return bool(self.findings)

    @property
    def reasons(self) -> tuple[OodReason, ...]:
        return tuple(dict.fromkeys(f.reason for f in self.findings))

    def summary(self) -> str:
        """One line for a clinician: the verdict, the score against its threshold, the reasons."""
        score = "" if self.score is None else f" (score {self.score:.4g}"
        if score and self.threshold is not None:
            score += f", threshold {self.threshold:.4g}"
        score += ")" if score else ""
        return f"{OUTSIDE}{score}: " + "; ".join(f.text for f in self.findings)


def content_findings(image: npt.NDArray[np.floating], checks: ContentChecks) -> list[OodFinding]:
    """Blank, constant or saturated pixels, judged on the preprocessed tensor in [0, 1]."""
    values = np.asarray(image, dtype=np.float64)
    findings = []
    std = float(values.std()) if values.size else 0.0
    if not math.isfinite(std) or std < checks.min_std:
        findings.append(
            OodFinding(OodReason.CONTENT, f"image is blank or constant (contrast below {checks.min_std:g})")
        )
    saturated = float(np.mean((values <= _SATURATION_EPS) | (values >= 1.0 - _SATURATION_EPS))) if values.size else 1
    if saturated >= checks.saturation_fraction:
        findings.append(
            OodFinding(
                OodReason.CONTENT,
                f"image is saturated ({saturated:.0%} of pixels at the ends of the range; "
                f"limit {checks.saturation_fraction:.0%})",
            )
        )
    return findings


def assess_image(ood: OodSpec | None, score: float | None, image: npt.NDArray[np.floating]) -> OodAssessment | None:
    """The detector's verdict on one preprocessed image and the score the graph gave it."""
    if ood is None:
        return None
    findings = content_findings(image, ood.content_checks) if ood.content_checks is not None else []
    if ood.threshold is not None and score is not None and not score <= ood.threshold:  # NaN is outside too
        findings.append(OodFinding(OodReason.OOD_SCORE, f"{ood.method} score above the validated threshold"))
    return OodAssessment(ood.method, score, ood.threshold, tuple(findings))


def assess_record(
    ood: OodSpec | None, names: Sequence[str], values: Sequence[float], imputed: Sequence[str]
) -> OodAssessment | None:
    """Each present feature against its training range; the count of imputed features against the cap."""
    if ood is None:
        return None
    findings = []
    for name, value in zip(names, values, strict=True):
        bounds = ood.training_ranges.get(name)
        if bounds is None or math.isnan(value):
            continue
        low, high = bounds
        if low <= value <= high:
            continue
        findings.append(
            OodFinding(OodReason.FEATURE_RANGE, f"{name} outside the range seen in training [{low:g}, {high:g}]")
        )
    if ood.max_imputed is not None and len(imputed) > ood.max_imputed:
        findings.append(
            OodFinding(
                OodReason.IMPUTED,
                f"{len(imputed)} features imputed; the model is validated with at most {ood.max_imputed}",
            )
        )
    departures = sum(f.reason is OodReason.FEATURE_RANGE for f in findings)
    if ood.max_imputed is not None:
        departures += max(0, len(imputed) - ood.max_imputed)
    return OodAssessment(ood.method, float(departures), 0.0, tuple(findings))
