"""FHIR R4 Bundles (and plain JSON features) -> the feature vector a tabular model expects.

The mapping is declared in ``model.toml`` ``[preprocessing]``: each feature comes from a LOINC
(or site code-system) Observation, or an Observation's ``component`` with that code (the US Core
blood-pressure panel), or from the Patient's birthDate or gender; quantities are accepted in the
declared UCUM unit or in listed alternatives with a reviewed conversion factor, and SI-unit LOINC
codes declared as alternatives are read too; coded values map through declared code tables.

A feature may declare the clinical context its value must carry (``context``): it is then filled
only from a reading whose code means that context, or whose ``method`` puts the feature's own
code in it; any other reading of the code (a ward heart rate for a stress test's maximum) is
ignored, so the feature is missing and imputed. Which reading is used when several exist is the
model's declared rule (``selection``, ``lookback_days``): the most recent reading with a value
within the look-back window. A ``dataAbsentReason`` counts as missing.

Nothing is guessed: an Observation for another patient, a quantity without a unit where the unit
matters, an unknown unit or code, or a value outside its plausible range is refused naming the
feature, never its value. :class:`ExtractedFeatures.used <ExtractedFeatures>` says, per feature,
what the model was given and from which resource.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.quantity import Quantity
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.domain import FeatureUse
from app.errors import (
    InvalidRequestError,
    MalformedBodyError,
    MissingFeaturesError,
    ModelSpecError,
    PayloadTooLargeError,
)
from app.parsing.numbers import loads_bounded

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
_USABLE_STATUS = frozenset({"final", "amended", "corrected", "preliminary"})
_BUNDLE_TYPES = frozenset({"collection", "transaction", "batch", "searchset"})
#: Search modes (FHIR R4 ``search-entry-mode``) of entries that belong to the record; ``outcome``
#: entries are the server's OperationOutcome about the search, not the patient's data.
_SEARCH_MODES_USED = frozenset({"match", "include"})
#: Units a count (declared unit ``"1"``) may come in; a count may also come without one.
_COUNT_UNITS = frozenset({"1", "{count}", ""})


class CodingSpec(BaseModel):
    """One ``system`` + ``code`` pair as ``model.toml`` declares it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str = Field(min_length=1)
    code: str = Field(min_length=1)


class FeatureContext(BaseModel):
    """The clinical context a feature's value must carry to be used (``context`` of a feature).

    ``codes`` are Observation (or component) codes that mean the feature in this context by
    themselves; ``methods`` are ``Observation.method`` codings that put the feature's own code
    (``loinc``/``code``, ``alternative_loinc``) in this context. A reading of the feature's code
    with neither is ignored: it is not the quantity the model was trained on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1)
    codes: tuple[CodingSpec, ...] = ()
    methods: tuple[CodingSpec, ...] = ()

    @model_validator(mode="after")
    def _something_carries_it(self) -> FeatureContext:
        if not self.codes and not self.methods:
            msg = "a context needs codes or methods that carry it"
            raise ValueError(msg)
        return self


class FeatureSpec(BaseModel):
    """One input feature as ``[[preprocessing.features]]`` declares it.

    ``valid_range`` is the plausibility range in the declared ``unit`` (for a feature derived from
    a measurement, of the measurement; for a coded feature, of its code values): outside it a
    value is refused as implausible. ``alternative_loinc`` maps further LOINC codes of the same
    quantity (typically the SI-unit code) to the unit that code is reported in, which must be
    ``unit`` or one of ``alternative_units``. ``lookback_days`` overrides the model's window.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    index: int = Field(ge=0)
    name: str
    source: Literal["Patient.birthDate", "Patient.gender"] | None = None
    loinc: str | None = None
    system: str | None = None
    code: str | None = None
    unit: str | None = None
    alternative_units: dict[str, float] = Field(default_factory=dict)
    alternative_loinc: dict[str, str] = Field(default_factory=dict)
    context: FeatureContext | None = None
    codes: dict[str, float] = Field(default_factory=dict)
    valid_range: tuple[float, float] | None = None
    zero_means_missing: bool = False
    derive: str | None = None
    derive_threshold: float | None = None
    lookback_days: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _alternatives_convert(self) -> FeatureSpec:
        for loinc, unit in self.alternative_loinc.items():
            if unit != self.unit and unit not in self.alternative_units:
                msg = f"alternative_loinc {loinc}: unit {unit!r} is neither unit nor one of alternative_units"
                raise ValueError(msg)
        if self.valid_range is not None and not self.valid_range[0] <= self.valid_range[1]:
            msg = "valid_range: low is above high"
            raise ValueError(msg)
        return self

    @property
    def label(self) -> str:
        """How the feature is named to the caller: its LOINC code, site code, or Patient field."""
        if self.loinc:
            return f"LOINC {self.loinc} ({self.name})"
        if self.code:
            return f"{self.code} ({self.name})"
        return f"{self.source} ({self.name})"

    @property
    def derived(self) -> bool:
        return self.derive == "greater_than" and self.derive_threshold is not None

    def own_codes(self) -> set[tuple[str | None, str | None]]:
        """The (system, code) pairs that name this feature's quantity, whatever its context."""
        own: set[tuple[str | None, str | None]] = {(LOINC, code) for code in self.alternative_loinc}
        if self.loinc:
            own.add((LOINC, self.loinc))
        elif self.code is not None:
            own.add((self.system, self.code))
        return own


class FeatureMap(BaseModel):
    """The ``[preprocessing]`` recipe of a model that takes EHR features.

    ``selection`` is how one reading is chosen when the record holds several of a feature:
    ``most_recent`` (whatever its age) or ``most_recent_within`` (the most recent with a value no
    more than ``lookback_days`` before the anchor: the newest reading of any of the model's
    features in the record, or the time of the request). Older readings are ignored.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Literal["fhir"]
    feature_order: tuple[str, ...]
    missing_policy: Literal["reject", "impute"] = "reject"
    required: tuple[str, ...] = ()
    imputation: dict[str, float] = Field(default_factory=dict)
    selection: Literal["most_recent", "most_recent_within"] = "most_recent"
    lookback_days: int | None = Field(default=None, gt=0)
    lookback_anchor: Literal["newest_reading", "now"] = "newest_reading"
    features: tuple[FeatureSpec, ...]

    @model_validator(mode="after")
    def _complete(self) -> FeatureMap:
        names = {f.name for f in self.features}
        if set(self.feature_order) != names or len(self.feature_order) != len(self.features):
            msg = "feature_order must name every declared feature once"
            raise ValueError(msg)
        if self.selection == "most_recent_within" and self.lookback_days is None:
            msg = "selection 'most_recent_within' needs lookback_days"
            raise ValueError(msg)
        if self.missing_policy == "impute":
            # What an imputed feature gave the model is shown to the clinician: it must be known.
            lacking = [n for n in self.feature_order if n not in self.required and n not in self.imputation]
            if lacking:
                msg = f"missing_policy 'impute' needs an imputation value for {lacking}"
                raise ValueError(msg)
        return self

    def ordered(self) -> list[FeatureSpec]:
        by_name = {f.name: f for f in self.features}
        return [by_name[name] for name in self.feature_order]

    def window(self, spec: FeatureSpec) -> timedelta | None:
        """How far back before the anchor a reading of ``spec`` may lie; None if any age will do."""
        if self.selection == "most_recent":
            return None
        days = spec.lookback_days or self.lookback_days
        return timedelta(days=days) if days is not None else None


def feature_map(preprocessing: Mapping[str, Any]) -> FeatureMap:
    """The model's FHIR recipe.

    Raises :class:`InvalidRequestError` if the model takes no EHR features, and
    :class:`ModelSpecError` naming the field if its recipe is inconsistent.
    """
    if preprocessing.get("kind") != "fhir":
        raise InvalidRequestError("this model does not take EHR features")
    try:
        return FeatureMap.model_validate(dict(preprocessing))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'preprocessing'}: {err['msg']}" for err in exc.errors()
        )
        raise ModelSpecError(f"preprocessing: {problems}") from exc


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


@dataclass(frozen=True, slots=True)
class _Reading:
    """One coded value in the record: an Observation, or one ``component`` of it.

    ``holder`` carries ``value[x]`` and ``dataAbsentReason``; time, status, method and subject
    are the Observation's.
    """

    observation: Observation
    holder: Observation | ObservationComponent
    codes: frozenset[tuple[str | None, str | None]]
    source: str | None

    @property
    def absent(self) -> bool:
        return self.holder.dataAbsentReason is not None


def _age_years(birth: date, on: date) -> float:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return float(years)


def _where_from(observation: Observation) -> str:
    return f"Observation/{observation.id}" if observation.id else "an Observation"


def _effective(observation: Observation) -> datetime:
    """When the observation was made.

    A partial dateTime (YYYY or YYYY-MM, which FHIR allows) is refused: ordering it against full
    dates, or placing it in a look-back window, would be a guess. So is a reading with no time at
    all, for the same reason: the selection rule could not place it.
    """
    moment: object = observation.effectiveDateTime or observation.issued
    if moment is None and observation.effectivePeriod is not None:
        moment = observation.effectivePeriod.end or observation.effectivePeriod.start
    if isinstance(moment, datetime):
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if isinstance(moment, date):  # FHIR dateTime may be just a date
        return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    where = _where_from(observation)
    if moment is not None:
        raise InvalidRequestError(f"{where}: effective time must be a full date or date-time, not a year or month")
    raise InvalidRequestError(f"{where}: no effective time or issued; the reading cannot be placed in time")


def _codings(concept: Any) -> frozenset[tuple[str | None, str | None]]:
    return frozenset((c.system, c.code) for c in (concept.coding or [])) if concept is not None else frozenset()


def _readings(observation: Observation, full_url: str | None) -> list[_Reading]:
    source = f"Observation/{observation.id}" if observation.id else full_url
    found = [_Reading(observation, observation, _codings(observation.code), source)]
    found += [_Reading(observation, c, _codings(c.code), source) for c in observation.component or []]
    return found


def _carries(spec: FeatureSpec, reading: _Reading) -> bool:
    """Whether the reading is this feature, in the clinical context the feature declares."""
    context = spec.context
    if context is None:
        return bool(spec.own_codes() & reading.codes)
    if {(c.system, c.code) for c in context.codes} & reading.codes:
        return True
    if not spec.own_codes() & reading.codes:
        return False
    methods = _codings(reading.observation.method)
    return bool({(c.system, c.code) for c in context.methods} & methods)


def _unit_of(quantity: Quantity) -> str | None:
    """The quantity's unit: its UCUM ``code``, else the ``unit`` text (accepted only if it is,
    letter for letter, one of the declared units). A ``code`` of another system is not UCUM."""
    if quantity.code and quantity.system in {None, UCUM}:
        return str(quantity.code)
    return str(quantity.unit) if quantity.unit is not None else None


def _in_declared_unit(spec: FeatureSpec, value: float, unit: str | None) -> float:
    if spec.unit is None:
        return value
    if spec.unit == "1" and (unit is None or unit in _COUNT_UNITS):
        return value
    accepted = ", ".join([spec.unit, *spec.alternative_units])
    if unit is None:
        raise InvalidRequestError(f"{spec.label}: the quantity has no unit (send a UCUM code: one of {accepted})")
    if unit == spec.unit:
        return value
    if unit in spec.alternative_units:
        return value * spec.alternative_units[unit]
    # The sent unit is not echoed: it is free text in the record, and error bodies are logged.
    raise InvalidRequestError(f"{spec.label}: unit not accepted (send one of: {accepted})")


def _quantity(spec: FeatureSpec, holder: Observation | ObservationComponent) -> float:
    quantity = holder.valueQuantity
    if quantity is not None and quantity.value is not None:
        if quantity.comparator is not None:
            raise InvalidRequestError(f"{spec.label}: a value with a comparator is a limit, not a measurement")
        return _in_declared_unit(spec, float(quantity.value), _unit_of(quantity))
    if holder.valueInteger is not None:
        return _in_declared_unit(spec, float(holder.valueInteger), None)
    raise InvalidRequestError(f"{spec.label}: expected a valueQuantity")


def _coded(spec: FeatureSpec, holder: Observation | ObservationComponent) -> float:
    if holder.valueBoolean is not None:
        key = "true" if holder.valueBoolean else "false"
        if key in spec.codes:
            return spec.codes[key]
    concept = holder.valueCodeableConcept
    if concept is not None:
        for coding in concept.coding or []:
            if coding.code in spec.codes:
                return spec.codes[coding.code]
        raise InvalidRequestError(f"{spec.label}: code not in the model's code table ({', '.join(spec.codes)})")
    if holder.valueQuantity is not None or holder.valueInteger is not None:
        value = _quantity(spec, holder)
        if value in spec.codes.values():
            return value
    raise InvalidRequestError(f"{spec.label}: expected one of the codes {', '.join(spec.codes)}")


def _reading_value(spec: FeatureSpec, reading: _Reading) -> float | None:
    holder = reading.holder
    threshold = spec.derive_threshold
    if spec.derive == "greater_than" and threshold is not None:
        if holder.valueBoolean is not None:
            return spec.codes["true" if holder.valueBoolean else "false"]
        measured = _quantity(spec, holder)
        _check_range(spec, measured)  # the measurement's plausibility, in the declared unit
        return spec.codes["true" if measured > threshold else "false"]
    value = _coded(spec, holder) if spec.codes else _quantity(spec, holder)
    if spec.zero_means_missing and value == 0:
        return None
    _check_range(spec, value)
    return value


def _check_range(spec: FeatureSpec, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidRequestError(f"{spec.label}: value is not a finite number")
    if spec.valid_range is not None:
        low, high = spec.valid_range
        if not low <= value <= high:
            raise InvalidRequestError(f"{spec.label}: value outside the plausible range [{low:g}, {high:g}]")


def _has_value(reading: _Reading) -> bool:
    holder = reading.holder
    values = (
        holder.valueQuantity,
        holder.valueCodeableConcept,
        holder.valueString,
        holder.valueBoolean,
        holder.valueInteger,
        holder.valueRange,
        holder.valueRatio,
        holder.valueSampledData,
        holder.valueTime,
        holder.valueDateTime,
        holder.valuePeriod,
    )
    return any(v is not None for v in values)


def _usable(spec: FeatureSpec, reading: _Reading) -> bool:
    """A reading with a value; one with a ``dataAbsentReason`` is a documented absence."""
    if reading.absent:
        if _has_value(reading):  # FHIR invariant obs-6 / obs-7
            raise InvalidRequestError(f"{spec.label}: a reading has both a value and a dataAbsentReason")
        return False
    return True


def _finish(fmap: FeatureMap, found: dict[str, float | None]) -> tuple[list[float], list[str]]:
    ordered = fmap.ordered()
    missing = [spec for spec in ordered if found.get(spec.name) is None]
    required_missing = [spec.label for spec in missing if spec.name in fmap.required]
    if missing and (fmap.missing_policy == "reject" or required_missing):
        labels = required_missing if fmap.missing_policy == "impute" else [spec.label for spec in missing]
        raise MissingFeaturesError("missing required features: " + "; ".join(labels))
    values = [math.nan if found.get(spec.name) is None else float(found[spec.name]) for spec in ordered]  # type: ignore[arg-type]
    return values, [spec.name for spec in missing]


def _uses(fmap: FeatureMap, values: list[float], sources: Mapping[str, str | None]) -> tuple[FeatureUse, ...]:
    """Per feature, in ``feature_order``: what the model got, in which unit, from where."""
    uses = []
    for spec, value in zip(fmap.ordered(), values, strict=True):
        unit = None if spec.codes else spec.unit
        if math.isnan(value):
            uses.append(FeatureUse(spec.name, fmap.imputation.get(spec.name, math.nan), unit, None, imputed=True))
        else:
            uses.append(FeatureUse(spec.name, value, unit, sources.get(spec.name), imputed=False))
    return tuple(uses)


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
    4300-digit limit) or nests too deep, or a number outside :mod:`app.parsing.numbers`' bounds
    (refused while parsing, before any ``float()``), :class:`PayloadTooLargeError` for too many values.
    """
    rough = body.count(b",") + body.count(b"[") + body.count(b"{")
    if rough > _PRESCAN_FACTOR * MAX_JSON_VALUES:
        raise PayloadTooLargeError(f"the JSON body holds more than {MAX_JSON_VALUES} values")
    try:
        document = loads_bounded(body)
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


def _record_entries(bundle: Bundle) -> list[tuple[Any, str | None]]:
    """The Bundle's resources that belong to the record (a searchset's ``outcome`` entries do not)."""
    entries = []
    for entry in bundle.entry or []:
        mode = entry.search.mode if entry.search is not None else None
        if mode is not None and mode not in _SEARCH_MODES_USED:
            continue
        entries.append((entry.resource, entry.fullUrl))
    return entries


def _patient_and_observations(
    bundle: Bundle,
) -> tuple[Patient, str | None, list[tuple[Observation, str | None]]]:
    patients: list[tuple[Patient, str | None]] = []
    observations: list[tuple[Observation, str | None]] = []
    for resource, full_url in _record_entries(bundle):
        if isinstance(resource, Patient):
            patients.append((resource, full_url))
        elif isinstance(resource, Observation):
            observations.append((resource, full_url))
    if len(patients) != 1:
        raise InvalidRequestError(f"the Bundle must hold exactly one Patient (found {len(patients)})")
    patient, full_url = patients[0]
    subject_refs = {f"Patient/{patient.id}"} if patient.id else set()
    if full_url:
        subject_refs.add(full_url)
    for observation, _ in observations:
        reference = observation.subject.reference if observation.subject else None
        if reference not in subject_refs:
            # Patient safety: never mix another patient's values into this prediction.
            raise InvalidRequestError("an Observation's subject is not the Bundle's Patient")
    return patient, full_url, [(o, url) for o, url in observations if o.status in _USABLE_STATUS]


@dataclass(slots=True)
class _Chosen:
    found: dict[str, float | None]
    sources: dict[str, str | None]
    observation_ids: list[str]
    latest: date | None


def _observation_features(
    fmap: FeatureMap, observations: list[tuple[Observation, str | None]], now: datetime
) -> _Chosen:
    """Per feature, the reading the declared selection rule picks, mapped and range-checked."""
    readings = [r for observation, url in observations for r in _readings(observation, url)]
    candidates: dict[str, list[tuple[datetime, _Reading]]] = {}
    for spec in fmap.ordered():
        if spec.source is None:
            carrying = [r for r in readings if _carries(spec, r)]
            candidates[spec.name] = [(_effective(r.observation), r) for r in carrying if _usable(spec, r)]
    newest = max((when for found in candidates.values() for when, _ in found), default=None)
    anchor = now if fmap.lookback_anchor == "now" else newest
    chosen = _Chosen({}, {}, [], None)
    for spec in fmap.ordered():
        window = fmap.window(spec)
        usable = [
            (when, r)
            for when, r in candidates.get(spec.name, [])
            if window is None or anchor is None or when >= anchor - window
        ]
        if not usable:
            continue
        when, reading = max(usable, key=lambda pair: pair[0])
        chosen.found[spec.name] = value = _reading_value(spec, reading)
        if value is None:
            continue
        chosen.sources[spec.name] = reading.source
        if reading.observation.id and reading.observation.id not in chosen.observation_ids:
            chosen.observation_ids.append(reading.observation.id)
        if chosen.latest is None or when.date() > chosen.latest:
            chosen.latest = when.date()
    return chosen


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


def from_bundle(body: bytes, fmap: FeatureMap, *, now: datetime | None = None) -> ExtractedFeatures:
    """Parse a FHIR R4 Bundle and map it. Raises 4xx-kind errors naming what is wrong.

    Age is computed at the date of the latest reading used (``now`` if there is none). ``now``
    (the request's time by default) is also the look-back anchor of a model that declares
    ``lookback_anchor = "now"``.
    """
    moment = now or datetime.now(UTC)
    patient, full_url, observations = _patient_and_observations(_load_bundle(body))
    chosen = _observation_features(fmap, observations, moment)
    found = chosen.found
    found.update(_patient_features(fmap, patient, chosen.latest or moment.date()))
    values, imputed = _finish(fmap, found)
    patient_reference = f"Patient/{patient.id}" if patient.id else full_url
    sources = chosen.sources | {spec.name: patient_reference for spec in fmap.features if spec.source is not None}
    identifier = patient.identifier[0].value if patient.identifier else None
    return ExtractedFeatures(
        values=values,
        names=list(fmap.feature_order),
        imputed=imputed,
        used=_uses(fmap, values, sources),
        observation_ids=chosen.observation_ids,
        patient_id=identifier or patient.id,
        patient_reference=patient_reference,
    )


def from_features(payload: Mapping[str, Any], fmap: FeatureMap) -> ExtractedFeatures:
    """``{"features": {name: number | code}}``, mapped through the same code tables and checks.

    Numbers are taken in the feature's declared unit (a plain-features caller has no other way to
    say one); a derived feature (``fbs``) takes its code, not the measurement.
    """
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
        if not spec.derived:  # a derived feature's range is its measurement's; its code table was checked
            _check_range(spec, value)
        found[name] = value
    values, imputed = _finish(fmap, found)
    sources = {name: "request" for name, value in found.items() if value is not None}
    return ExtractedFeatures(
        values=values, names=list(fmap.feature_order), imputed=imputed, used=_uses(fmap, values, sources)
    )


def parse_features_json(body: bytes) -> dict[str, Any]:
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise InvalidRequestError("expected a JSON object")
    return payload


__all__: Sequence[str] = (
    "LOINC",
    "MAX_JSON_DEPTH",
    "MAX_JSON_VALUES",
    "UCUM",
    "CodingSpec",
    "ExtractedFeatures",
    "FeatureContext",
    "FeatureMap",
    "FeatureSpec",
    "FeatureUse",
    "feature_map",
    "from_bundle",
    "from_features",
    "load_json",
)
