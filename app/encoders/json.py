"""The JSON prediction: one shape for every input path (EHR today, imaging next)."""

from __future__ import annotations

from typing import Any

from app.inference.registry import ServedVersion
from app.postprocess.classification import Classification


def prediction(
    served: ServedVersion,
    classification: Classification,
    *,
    request_id: str | None,
    input_summary: dict[str, Any],
) -> dict[str, Any]:
    spec = served.spec
    warnings = ["not for clinical use"] if spec.not_for_clinical_use else []
    return {
        "request_id": request_id,
        "model": {
            "name": spec.name,
            "version": served.version,
            "sha256": served.sha256,
            "intended_use": spec.intended_use,
            "not_for_clinical_use": spec.not_for_clinical_use,
        },
        "probabilities": classification.probabilities,
        "decision": {
            "label": classification.label,
            "positive": classification.positive,
            "positive_label": classification.positive_label,
            "threshold": classification.threshold,
            "operating_point": classification.operating_point,
        },
        "input": input_summary,
        "warnings": warnings,
    }
