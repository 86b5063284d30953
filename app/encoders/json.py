"""The JSON prediction: one shape for every input path (EHR records and DICOM studies)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.domain import FeatureUse
from app.inference.registry import ServedVersion
from app.postprocess.classification import Classification
from app.postprocess.ood import OUTSIDE, OodAssessment


def prediction(
    served: ServedVersion,
    classification: Classification,
    *,
    request_id: str | None,
    input_summary: dict[str, Any],
) -> dict[str, Any]:
    spec = served.spec
    warnings = ["not for clinical use"] if spec.not_for_clinical_use else []
    if classification.indeterminate and classification.ood is not None:
        warnings.append(classification.ood.summary())
    return {
        "request_id": request_id,
        "model": {
            "name": spec.name,
            "version": served.version,
            "sha256": served.sha256,
            "intended_use": spec.intended_use,
            "not_for_clinical_use": spec.not_for_clinical_use,
        },
        "probabilities": shown_probabilities(classification),
        "decision": {
            "label": classification.label,
            "indeterminate": classification.indeterminate,
            "positive": classification.positive,
            "positive_label": classification.positive_label,
            "threshold": classification.threshold,
            "operating_point": classification.operating_point,
        },
        "validated_input": validated_input(classification.ood),
        "input": input_summary,
        "warnings": warnings,
    }


def shown_probabilities(classification: Classification) -> dict[str, float] | None:
    """None for an indeterminate answer: a probability the model cannot stand behind is not shown,
    so no client can display "pneumonia 100 %" for an image the model has never seen the like of.
    The audit event keeps the raw outputs."""
    return None if classification.indeterminate else classification.probabilities


def validated_input(ood: OodAssessment | None) -> dict[str, Any] | None:
    """The detector's verdict: inside or outside what the model was validated on, and why.

    None when the model version declares no detector (its answers cannot say either way).
    """
    if ood is None:
        return None
    return {
        "inside": not ood.outside,
        "verdict": OUTSIDE if ood.outside else "inside the model's validated input",
        "method": ood.method,
        "score": ood.score,
        "threshold": ood.threshold,
        "reasons": [{"code": f.reason.value, "text": f.text} for f in ood.findings],
    }


def features_used(used: Sequence[FeatureUse]) -> list[dict[str, Any]]:
    """Per feature: the value the model received, its unit, where it came from, whether imputed."""
    return [{"name": u.name, "value": u.value, "unit": u.unit, "source": u.source, "imputed": u.imputed} for u in used]
