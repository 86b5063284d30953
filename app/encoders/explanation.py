"""A result's feature contributions in the shapes a clinician's system displays: JSON and FHIR.

The numbers mean nothing without their frame, so both shapes carry one sentence that says what
they are: the output space, the reference patient they are measured from, and that they add up
to the difference between this patient's output and the reference's. Features are listed by
the size of their contribution, largest first, because that is the order a reader wants.
"""

from __future__ import annotations

import math
from typing import Any, Final

from app.postprocess.explain import Contributions

#: One extension per input feature on the RiskAssessment: its name and contribution.
FEATURE_CONTRIBUTION_EXTENSION: Final = "urn:medinfer:fhir:StructureDefinition:feature-contribution"
_SPACE_TEXT: Final = {"log_odds": "log-odds", "probability": "probability"}


def explanation_json(contributions: Contributions, *, label: str | None = None) -> dict[str, Any]:
    """The ``explanation`` member of the JSON answer.

    ``value_given`` is what the model received (null where the record lacked the feature and
    the model imputed it, with ``imputed: true``), ``baseline`` the reference value it is
    measured against.
    """
    rows = []
    for i in _by_size(contributions):
        given = contributions.inputs[i]
        rows.append(
            {
                "feature": contributions.names[i],
                "value_given": None if math.isnan(given) else given,
                "imputed": math.isnan(given),
                "baseline": contributions.baselines[i],
                "contribution": contributions.values[i],
            }
        )
    return {
        "method": "shapley",
        "computation": contributions.method,
        "space": contributions.space,
        "label": label,
        "base_value": contributions.base_value,
        "output_value": contributions.output_value,
        "contributions": rows,
        "statement": statement(contributions, label=label),
    }


def explanation_fhir(
    contributions: Contributions, *, label: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Extensions (one per feature) and a ``note`` for the RiskAssessment.

    The extensions are for a system that renders a chart of the contributions; the note is for
    one that only shows text. Append both to the resource's ``extension`` and ``note`` lists.
    """
    space = _SPACE_TEXT[contributions.space]
    extensions = [
        {
            "url": FEATURE_CONTRIBUTION_EXTENSION,
            "extension": [
                {"url": "name", "valueString": contributions.names[i]},
                {"url": "contribution", "valueDecimal": _decimal(contributions.values[i])},
                {"url": "space", "valueCode": space},
            ],
        }
        for i in _by_size(contributions)
    ]
    parts = [f"{contributions.names[i]} {contributions.values[i]:+.3f}" for i in _by_size(contributions)]
    note = {"text": f"{statement(contributions, label=label)} Contributions: {'; '.join(parts)}."}
    return extensions, note


def statement(contributions: Contributions, *, label: str | None = None) -> str:
    """One sentence saying what the numbers mean."""
    target = f"P({label})" if label else "the positive label's probability"
    if contributions.space == "log_odds":
        scale = f"log-odds of {target}; exp(contribution) is the factor by which it multiplies the odds"
    else:
        scale = f"{target}, on the 0-1 scale"
    return (
        f"Exact Shapley contributions in {scale}: each says how far that feature's value moved the "
        f"model's output from the reference patient's ({contributions.base_value:.3f}, the training "
        f"baseline) to this patient's ({contributions.output_value:.3f}); they sum to the difference. "
        "They describe the model, not the patient's physiology."
    )


def _by_size(contributions: Contributions) -> list[int]:
    return sorted(range(len(contributions.names)), key=lambda i: (-abs(contributions.values[i]), i))


def _decimal(value: float) -> float:
    return round(value, 6)
