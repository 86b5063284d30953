"""Which model reads which image: routing rules on Modality and BodyPartExamined.

Rules come only from the site's configuration, ``MEDINFER_IMAGING_ROUTES`` (a JSON list, first
match wins). Unset or empty, no model is routed and every C-STORE or STOW-RS instance is refused:
a model's own allow-lists in ``model.toml`` never enable it for studies a PACS sends, because a
hospital must decide which model reads its images. A rule only picks the model; the model's
full allow-lists are still checked afterwards, and in production a rule naming a
not-for-clinical-use model that is not acknowledged finds it refused (``model-not-acknowledged``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import ModelSpecError, NoRouteError
from app.parsing.dicom import DicomInstance


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    modalities: frozenset[str]  # empty: any
    body_parts: frozenset[str]  # empty: any
    explain: bool = False  # send the model's explanation (a saliency map) to the PACS with the SR

    def matches(self, modality: str | None, body_part: str | None) -> bool:
        return (not self.modalities or (modality or "").strip().upper() in self.modalities) and (
            not self.body_parts or (body_part or "").strip().upper() in self.body_parts
        )


def _codes(value: object, field: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        msg = f"imaging route: {field} must be a string or a list of strings"
        raise ModelSpecError(msg)
    return frozenset(v.strip().upper() for v in value)


def parse_routes(text: str) -> tuple[Route, ...]:
    """``[{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": "cxr-pneumonia", "explain": true}]``.

    ``explain`` (optional, default false) asks for the model's explanation of every study the
    rule routes: its saliency map goes to the PACS beside the SR, which references it.
    """
    try:
        raw = json.loads(text)
    except ValueError as exc:
        msg = "MEDINFER_IMAGING_ROUTES is not valid JSON"
        raise ModelSpecError(msg) from exc
    if not isinstance(raw, list):
        msg = "MEDINFER_IMAGING_ROUTES must be a JSON list of rules"
        raise ModelSpecError(msg)
    routes = []
    for rule in raw:
        if (
            not isinstance(rule, dict)
            or not isinstance(rule.get("model"), str)
            or set(rule)
            - {
                "model",
                "modality",
                "body_part",
                "explain",
            }
            or not isinstance(rule.get("explain", False), bool)
        ):
            msg = "each imaging route needs a model name and only modality/body_part keys and a boolean explain"
            raise ModelSpecError(msg)
        routes.append(
            Route(
                rule["model"],
                _codes(rule.get("modality"), "modality"),
                _codes(rule.get("body_part"), "body_part"),
                explain=rule.get("explain", False),
            )
        )
    return tuple(routes)


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        """``routes``: the site's rules, first match wins; empty routes nothing."""
        self._routes = tuple(routes)

    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def explains(self, model: str) -> bool:
        """Whether a rule that routes to ``model`` asks for its explanation."""
        return any(route.explain for route in self._routes if route.model == model)

    def model_for(self, instance: DicomInstance) -> str:
        for route in self._routes:
            if route.matches(instance.modality, instance.body_part):
                return route.model
        raise NoRouteError(
            "no routing rule in MEDINFER_IMAGING_ROUTES enables a model for this Modality and BodyPartExamined"
        )
