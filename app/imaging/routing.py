"""Which model reads which image: routing rules on Modality and BodyPartExamined.

Rules come from ``MEDINFER_IMAGING_ROUTES`` (a JSON list, first match wins) or, when that is
unset, from each served DICOM model's own allow-lists in ``model.toml``, in name order. A rule
only picks the model; the model's full allow-lists are still checked afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from app.errors import ModelSpecError, NoRouteError
from app.inference.spec import ModelSpec
from app.parsing.dicom import DicomInstance


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    modalities: frozenset[str]  # empty: any
    body_parts: frozenset[str]  # empty: any

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
    """``[{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": "cxr-pneumonia"}]``."""
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
            }
        ):
            msg = "each imaging route needs a model name and only modality/body_part keys"
            raise ModelSpecError(msg)
        routes.append(
            Route(rule["model"], _codes(rule.get("modality"), "modality"), _codes(rule.get("body_part"), "body_part"))
        )
    return tuple(routes)


def routes_from_specs(specs: Iterable[ModelSpec]) -> tuple[Route, ...]:
    return tuple(
        Route(
            spec.name,
            _codes(spec.preprocessing.get("modalities"), "modalities"),
            _codes(spec.preprocessing.get("body_parts"), "body_parts"),
        )
        for spec in sorted(specs, key=lambda s: s.name)
        if spec.preprocessing.get("kind") == "dicom"
    )


class Router:
    def __init__(self, explicit: Sequence[Route] | None, specs: Callable[[], Iterable[ModelSpec]]) -> None:
        """``specs`` lists the models serving now, so a model loaded later is routed to."""
        self._explicit = tuple(explicit) if explicit is not None else None
        self._specs = specs

    def routes(self) -> tuple[Route, ...]:
        return self._explicit if self._explicit is not None else routes_from_specs(self._specs())

    def model_for(self, instance: DicomInstance) -> str:
        for route in self.routes():
            if route.matches(instance.modality, instance.body_part):
                return route.model
        raise NoRouteError("no routing rule takes this Modality and BodyPartExamined")
