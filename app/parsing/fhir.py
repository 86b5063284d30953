"""FHIR R4 Bundles (and plain JSON features) -> the feature vector a tabular model expects.

The mapping is declared in ``model.toml`` ``[preprocessing]``: each feature comes from a LOINC
(or site code-system) Observation, or from the Patient's birthDate or gender; quantities are
accepted in the declared UCUM unit or in listed alternatives with a reviewed conversion factor;
coded values map through declared code tables. Nothing is guessed: an Observation for another
patient, an unknown unit or code, or a value outside its plausible range is refused naming the
feature, never its value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final, Literal

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import InvalidRequestError, MalformedBodyError, MissingFeaturesError, PayloadTooLargeError

LOINC = "http://loinc.org"
_USABLE_STATUS = frozenset({"final", "amended", "corrected", "preliminary"})
_BUNDLE_TYPES = frozenset({"collection", "transaction", "batch"})


class FeatureSpec(BaseModel):
    """One input feature as ``[[preprocessing.features]]`` declares it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    index: int = Field(ge=0)
    name: str
    source: Literal["Patient.birthDate", "Patient.gender"] | None = None
    loinc: str | None = None
    system: str | None = None
    code: str | None = None
    unit: str | None = None
    alternative_units: dict[str, float] = Field(default_factory=dict)
    codes: dict[str, float] = Field(default_factory=dict)
    valid_range: tuple[float, float] | None = None
    zero_means_missing: bool = False
    derive: str | None = None
    derive_threshold: float | None = None

    @property
    def label(self) -> str:
        """How the feature is named to the caller: its LOINC code, site code, or Patient field."""
        if self.loinc:
            return f"LOINC {self.loinc} ({self.name})"
        if self.code:
            return f"{self.code} ({self.name})"
        return f"{self.source} ({self.name})"


class FeatureMap(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Literal["fhir"]
    feature_order: tuple[str, ...]
    missing_policy: Literal["reject", "impute"] = "reject"
    required: tuple[str, ...] = ()
    imputation: dict[str, float] = Field(default_factory=dict)
    features: tuple[FeatureSpec, ...]

    def ordered(self) -> list[FeatureSpec]:
        by_name = {f.name: f for f in self.features}
        return [by_name[name] for name in self.feature_order]


def feature_map(preprocessing: Mapping[str, Any]) -> FeatureMap:
    """The model's FHIR recipe; :class:`InvalidRequestError` if the model takes no EHR features."""
    if preprocessing.get("kind") != "fhir":
        raise InvalidRequestError("this model does not take EHR features")
    return FeatureMap.model_validate(dict(preprocessing))


@dataclass(frozen=True, slots=True)
class FeatureUse:
    """What one feature gave the model, and where it came from: shown to the clinician.

    ``value`` is what the model received in the declared ``unit`` (after unit conversion and
    code mapping); for an imputed feature it is the imputation value the graph substitutes.
    ``source`` is a FHIR reference (``Observation/id``, ``Patient/id``), ``"request"`` for plain
    features, or None when imputed.
    """

    name: str
    value: float
    unit: str | None
    source: str | None
    imputed: bool


@dataclass(frozen=True, slots=True)
class ExtractedFeatures:
    """The vector (NaN where missing and imputed by the model), and where each value came from."""

    values: list[float]
    names: list[str]
    imputed: list[str] = field(default_factory=list)
    used: tuple[FeatureUse, ...] = ()
    observation_ids: list[str] = field(default_factory=list)
    patient_id: str | None = None
    patient_reference: str | None = None


def _age_years(birth: date, on: date) -> float:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return float(years)


def _effective(observation: Observation) -> datetime:
    """When the observation was made; ``datetime.min`` if the record does not say.

    A partial dateTime (YYYY or YYYY-MM, which FHIR allows) is refused: ordering it against full
    dates would be a guess, and the latest reading of a feature is the one the model gets.
    """
    moment: object = observation.effectiveDateTime or observation.issued
    if moment is None and observation.effectivePeriod is not None:
        moment = observation.effectivePeriod.end or observation.effectivePeriod.start
    if isinstance(moment, datetime):
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if isinstance(moment, date):  # FHIR dateTime may be just a date
        return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    if moment is not None:
        where = f"Observation/{observation.id}" if observation.id else "an Observation"
        raise InvalidRequestError(f"{where}: effective time must be a full date or date-time, not a year or month")
    return datetime.min.replace(tzinfo=UTC)


def _codes(observation: Observation) -> set[tuple[str | None, str | None]]:
    return {(c.system, c.code) for c in (observation.code.coding or [])}


def _matches(spec: FeatureSpec, observation: Observation) -> bool:
    codes = _codes(observation)
    if spec.loinc:
        return (LOINC, spec.loinc) in codes
    return spec.code is not None and (spec.system, spec.code) in codes


def _quantity(spec: FeatureSpec, observation: Observation) -> float:
    quantity = observation.valueQuantity
    if quantity is not None and quantity.value is not None:
        unit = quantity.code or quantity.unit
        value = float(quantity.value)
        if spec.unit is None or unit in {spec.unit, None} or (spec.unit == "1" and unit in {"{count}", ""}):
            return value
        if unit in spec.alternative_units:
            return value * spec.alternative_units[unit]
        accepted = ", ".join([spec.unit, *spec.alternative_units])
        # The sent unit is not echoed: it is free text in the record, and error bodies are logged.
        raise InvalidRequestError(f"{spec.label}: unit not accepted (send one of: {accepted})")
    if observation.valueInteger is not None:
        return float(observation.valueInteger)
    raise InvalidRequestError(f"{spec.label}: expected a valueQuantity")


def _coded(spec: FeatureSpec, observation: Observation) -> float:
    if observation.valueBoolean is not None:
        key = "true" if observation.valueBoolean else "false"
        if key in spec.codes:
            return spec.codes[key]
    concept = observation.valueCodeableConcept
    if concept is not None:
        for coding in concept.coding or []:
            if coding.code in spec.codes:
                return spec.codes[coding.code]
        raise InvalidRequestError(f"{spec.label}: code not in the model's code table ({', '.join(spec.codes)})")
    if observation.valueQuantity is not None or observation.valueInteger is not None:
        value = _quantity(spec, observation)
        if value in spec.codes.values():
            return value
    raise InvalidRequestError(f"{spec.label}: expected one of the codes {', '.join(spec.codes)}")


def _observation_value(spec: FeatureSpec, observation: Observation) -> float | None:
    if spec.derive == "greater_than" and spec.derive_threshold is not None:
        if observation.valueBoolean is not None:
            return spec.codes["true" if observation.valueBoolean else "false"]
        exceeded = _quantity(spec, observation) > spec.derive_threshold
        return spec.codes["true" if exceeded else "false"]
    value = _coded(spec, observation) if spec.codes else _quantity(spec, observation)
    if spec.zero_means_missing and value == 0:
        return None
    return value


def _check_range(spec: FeatureSpec, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidRequestError(f"{spec.label}: value is not a finite number")
    if spec.valid_range is not None:
        low, high = spec.valid_range
        if not low <= value <= high:
            raise InvalidRequestError(f"{spec.label}: value outside the plausible range [{low:g}, {high:g}]")


def _finish(fmap: FeatureMap, found: dict[str, float | None]) -> tuple[list[float], list[str]]:
    ordered = fmap.ordered()
    missing = [spec for spec in ordered if found.get(spec.name) is None]
    required_missing = [spec.label for spec in missing if spec.name in fmap.required]
    if missing and (fmap.missing_policy == "reject" or required_missing):
        labels = required_missing if fmap.missing_policy == "impute" else [spec.label for spec in missing]
        raise MissingFeaturesError("missing required features: " + "; ".join(labels))
    values = [math.nan if found.get(spec.name) is None else float(found[spec.name]) for spec in ordered]  # type: ignore[arg-type]
    return values, [spec.name for spec in missing]


MAX_JSON_DEPTH: Final = 64
"""Deepest nesting of arrays and objects a body may have. FHIR resources nest about ten levels
(extensions a few more); Python's ``json`` and the FHIR models recurse, and fail, near 1000."""

MAX_JSON_VALUES: Final = 50_000
"""Most JSON values (objects, arrays, scalars) a body may hold: one patient's record of about
1,000 US Core laboratory Observations (~50 values each), far more than a prediction needs.
Validating a Bundle costs about 20 microseconds and 300 bytes per value, and a value that fails
validation more (pydantic builds an error for each), so this bounds a request to about a second
and tens of MB however the bytes under the body cap are spent: the hostile corpus measures it
(60,000 unknown keys cost 72 MiB of peak memory when this cap was 200,000)."""

_PRESCAN_FACTOR: Final = 4


def load_json(body: bytes) -> Any:
    """Parse a JSON body within :data:`MAX_JSON_DEPTH` and :data:`MAX_JSON_VALUES`.

    Before parsing, commas and opening brackets are counted (an upper bound on the values, as
    they also count those inside strings; hence the slack), so ``json`` never builds millions of
    objects; after it, the tree is walked for the exact count and depth. Raises
    :class:`MalformedBodyError` for JSON that does not parse (including integers over Python's
    4300-digit limit) or nests too deep, :class:`PayloadTooLargeError` for too many values.
    """
    rough = body.count(b",") + body.count(b"[") + body.count(b"{")
    if rough > _PRESCAN_FACTOR * MAX_JSON_VALUES:
        raise PayloadTooLargeError(f"the JSON body holds more than {MAX_JSON_VALUES} values")
    try:
        document = json.loads(body)
    except RecursionError:
        raise MalformedBodyError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digits over the limit
        raise MalformedBodyError("request body is not valid JSON") from exc
    _check_shape(document)
    return document


def _check_shape(document: Any) -> None:
    """Count the values and measure the depth iteratively: a recursive walk is what fails."""
    values = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        values += 1
        if values > MAX_JSON_VALUES:
            raise PayloadTooLargeError(f"the JSON body holds more than {MAX_JSON_VALUES} values")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > MAX_JSON_DEPTH:  # a container nested deeper than the cap; scalars may sit below it
            raise MalformedBodyError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _where(loc: Sequence[int | str], kind: str) -> str:
    """A validation error's place, by FHIR element names only. An unknown element's own key is
    the caller's text (it could be anything, a patient's name included), so it is not repeated."""
    if kind == "extra_forbidden":
        return f"unknown element under {'.'.join(str(p) for p in loc[:-1]) or 'the Bundle'}"
    return ".".join(str(p) for p in loc)


def _load_bundle(body: bytes) -> Bundle:
    raw = load_json(body)
    if not isinstance(raw, dict) or raw.get("resourceType") != "Bundle":
        raise InvalidRequestError("expected a FHIR Bundle (resourceType 'Bundle')")
    try:
        bundle = Bundle.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        where = "; ".join(_where(err["loc"], err["type"]) for err in errors[:3])
        raise InvalidRequestError(f"Bundle is not valid FHIR R4: {where}") from exc
    except (LookupError, TypeError, ValueError) as exc:
        # fhir.resources raises KeyError for a resourceType it has no model for, and a few
        # builtins for other shapes it does not expect: all of them are the caller's Bundle.
        raise InvalidRequestError("Bundle is not valid FHIR R4: an unknown resource type or element shape") from exc
    if bundle.type not in _BUNDLE_TYPES:
        raise InvalidRequestError(f"Bundle.type must be one of {sorted(_BUNDLE_TYPES)}")
    return bundle


def _patient_and_observations(bundle: Bundle) -> tuple[Patient, str | None, list[Observation]]:
    patients: list[tuple[Patient, str | None]] = []
    observations: list[Observation] = []
    for entry in bundle.entry or []:
        if isinstance(entry.resource, Patient):
            patients.append((entry.resource, entry.fullUrl))
        elif isinstance(entry.resource, Observation):
            observations.append(entry.resource)
    if len(patients) != 1:
        raise InvalidRequestError(f"the Bundle must hold exactly one Patient (found {len(patients)})")
    patient, full_url = patients[0]
    subject_refs = {f"Patient/{patient.id}"} if patient.id else set()
    if full_url:
        subject_refs.add(full_url)
    for observation in observations:
        reference = observation.subject.reference if observation.subject else None
        if reference not in subject_refs:
            # Patient safety: never mix another patient's values into this prediction.
            raise InvalidRequestError("an Observation's subject is not the Bundle's Patient")
    return patient, full_url, [o for o in observations if o.status in _USABLE_STATUS]


def _observation_features(
    fmap: FeatureMap, observations: list[Observation]
) -> tuple[dict[str, float | None], list[str], date | None]:
    """The latest usable Observation per feature (by effective time), mapped and range-checked."""
    found: dict[str, float | None] = {}
    used: list[str] = []
    latest: date | None = None
    for spec in fmap.ordered():
        candidates = [o for o in observations if _matches(spec, o)] if spec.source is None else []
        if not candidates:
            continue
        observation = max(candidates, key=_effective)
        value = _observation_value(spec, observation)
        if value is not None:
            _check_range(spec, value)
        found[spec.name] = value
        if observation.id:
            used.append(observation.id)
        moment = _effective(observation)
        if moment.year > 1 and (latest is None or moment.date() > latest):
            latest = moment.date()
    return found, used, latest


def _patient_features(fmap: FeatureMap, patient: Patient, on: date) -> dict[str, float]:
    found: dict[str, float] = {}
    for spec in fmap.ordered():
        if spec.source == "Patient.birthDate" and patient.birthDate is not None:
            if not isinstance(patient.birthDate, date):
                # FHIR allows YYYY and YYYY-MM; an age from them would be a guess of up to a year.
                raise InvalidRequestError(f"{spec.label}: Patient.birthDate must be a full date (YYYY-MM-DD)")
            age = _age_years(patient.birthDate, on)
            _check_range(spec, age)
            found[spec.name] = age
        elif spec.source == "Patient.gender" and patient.gender is not None:
            if patient.gender not in spec.codes:
                raise InvalidRequestError(  # the sent value is not echoed (it is the patient's)
                    f"{spec.label}: gender has no code in this model (send one of: {', '.join(spec.codes)})"
                )
            found[spec.name] = spec.codes[patient.gender]
    return found


def from_bundle(body: bytes, fmap: FeatureMap) -> ExtractedFeatures:
    """Parse a FHIR R4 Bundle and map it. Raises 4xx-kind errors naming what is wrong.

    Age is computed at the date of the latest Observation used (today if there is none).
    """
    patient, full_url, observations = _patient_and_observations(_load_bundle(body))
    found, used, latest = _observation_features(fmap, observations)
    found.update(_patient_features(fmap, patient, latest or datetime.now(UTC).date()))
    values, imputed = _finish(fmap, found)
    identifier = patient.identifier[0].value if patient.identifier else None
    return ExtractedFeatures(
        values=values,
        names=list(fmap.feature_order),
        imputed=imputed,
        observation_ids=used,
        patient_id=identifier or patient.id,
        patient_reference=f"Patient/{patient.id}" if patient.id else full_url,
    )


def from_features(payload: Mapping[str, Any], fmap: FeatureMap) -> ExtractedFeatures:
    """``{"features": {name: number | code}}``, mapped through the same code tables and checks."""
    features = payload.get("features")
    if not isinstance(features, Mapping):
        raise InvalidRequestError("expected {'features': {name: value}}")
    known = {spec.name: spec for spec in fmap.features}
    unknown = sorted(set(features) - set(known))
    if unknown:
        # The keys are the caller's text, not repeated (error bodies are logged): count them.
        raise InvalidRequestError(f"{len(unknown)} unknown feature name(s); the model takes {list(fmap.feature_order)}")
    found: dict[str, float | None] = {}
    for name, raw in features.items():
        spec = known[name]
        if raw is None:
            found[name] = None
            continue
        if isinstance(raw, str | bool):
            key = str(raw).lower() if isinstance(raw, bool) else raw
            if key not in spec.codes:
                raise InvalidRequestError(f"{spec.label}: code not in the model's code table ({', '.join(spec.codes)})")
            value = spec.codes[key]
        elif isinstance(raw, int | float):
            value = float(raw)
            if spec.codes and value not in spec.codes.values():
                raise InvalidRequestError(f"{spec.label}: expected one of the codes {', '.join(spec.codes)}")
        else:
            raise InvalidRequestError(f"{spec.label}: expected a number or a code")
        _check_range(spec, value)
        found[name] = value
    values, imputed = _finish(fmap, found)
    return ExtractedFeatures(values=values, names=list(fmap.feature_order), imputed=imputed)


def parse_features_json(body: bytes) -> dict[str, Any]:
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise InvalidRequestError("expected a JSON object")
    return payload


__all__: Sequence[str] = (
    "MAX_JSON_DEPTH",
    "MAX_JSON_VALUES",
    "ExtractedFeatures",
    "FeatureMap",
    "FeatureUse",
    "feature_map",
    "from_bundle",
    "from_features",
    "load_json",
)
