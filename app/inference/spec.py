"""``model.toml`` -> :class:`ModelSpec`: the typed, validated description of one model.

The repository layout is Triton-like: ``<repo>/<name>/model.toml`` and one folder per version
holding ``model.onnx``. The TOML pins every version's sha256, so a file that changed on disk is
refused before ONNX Runtime reads it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.errors import ModelSpecError

#: Open Inference Protocol v2 tensor datatypes.
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip
ExecutionProvider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str = Field(min_length=1, max_length=128)
    datatype: Datatype
    shape: tuple[int, ...] = Field(min_length=1, description="-1 marks a dynamic axis; axis 0 is batch.")
    allow_non_finite: bool = Field(default=False, description="Accept NaN/Inf in this input (e.g. as 'missing').")

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d == 0 or d < -1 for d in shape):
            msg = "dimensions must be positive or -1 (dynamic)"
            raise ValueError(msg)
        return shape


#: Where an operating point's figures were measured. ``validation`` is the split the threshold was
#: chosen on (optimistic); ``internal_test`` is held-out data of the training sites;
#: ``external_test`` is a site the model never saw.
DataSplit = Literal["validation", "internal_test", "external_test"]


class OperatingPoint(_Strict):
    threshold: float = Field(ge=0.0, le=1.0)
    sensitivity: float | None = Field(default=None, ge=0.0, le=1.0)
    specificity: float | None = Field(default=None, ge=0.0, le=1.0)
    split: DataSplit | None = Field(default=None, description="The data the sensitivity and specificity come from.")


class ContentChecks(_Strict):
    """Cheap checks on the preprocessed image tensor (values in the model's input range)."""

    min_std: float = Field(ge=0.0, description="Below this standard deviation the image is blank or constant.")
    saturation_fraction: float = Field(
        gt=0.0, le=1.0, description="At or above this share of pixels at the range's ends the image is saturated."
    )


class OodSpec(_Strict):
    """How a version recognises input outside what it was validated on (``[ood]`` in model.toml).

    Imaging models declare an ONNX output holding one score per image (higher = further from
    the training data) and the threshold above which no label is decided; the statistics behind
    the score live in the graph, so the version's sha256 pins them. Record models declare each
    feature's training range and a cap on imputed features.
    """

    method: str = Field(min_length=1, description="What the score is, e.g. 'mahalanobis-penultimate'.")
    output: str | None = Field(default=None, description="ONNX output with one OOD score per batch row.")
    threshold: float | None = Field(default=None, description="A score above this is outside the validated input.")
    content_checks: ContentChecks | None = None
    training_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Per feature: the [low, high] seen in training; outside is indeterminate."
    )
    max_imputed: int | None = Field(default=None, ge=0, description="More imputed features is indeterminate.")
    calibration: str = Field(default="", description="How the statistics and threshold were calibrated.")
    in_distribution_flagged: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Measured share of the in-distribution test set flagged."
    )

    @model_validator(mode="after")
    def _threshold_with_output(self) -> OodSpec:
        if (self.output is None) != (self.threshold is None):
            msg = "ood.output and ood.threshold go together"
            raise ValueError(msg)
        for name, (low, high) in self.training_ranges.items():
            if not low <= high:
                msg = f"ood.training_ranges.{name}: low is above high"
                raise ValueError(msg)
        return self


class ExplainSpec(_Strict):
    """How a model explains a result (``[explain]`` in model.toml); explanations are opt-in.

    ``shapley``: exact Shapley values over the model's own graph for tabular inputs, against
    ``baseline`` (one reference value per feature, from the training data), reported in
    ``space``. ``cam``: class activation map read from the graph's ``output`` (one map per image
    for the positive label, ``[-1, H, W]``). ``occlusion``: model-agnostic occlusion sensitivity.
    """

    method: Literal["shapley", "cam", "occlusion"]
    output: str | None = Field(default=None, description="cam: the ONNX output holding the map.")
    baseline: dict[str, float] = Field(default_factory=dict, description="shapley: reference value per feature.")
    space: Literal["probability", "log_odds"] = Field(
        default="log_odds", description="The output space contributions are reported in."
    )

    @model_validator(mode="after")
    def _cam_names_its_output(self) -> ExplainSpec:
        if self.method == "cam" and self.output is None:
            msg = "explain.method 'cam' needs the output that holds the map"
            raise ValueError(msg)
        return self


class Monitoring(_Strict):
    """Post-market monitoring (``[monitoring]`` in model.toml)."""

    sensitivity_margin: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Alert when the sensitivity confirmed by outcome feedback falls below the operating point's "
        "claimed sensitivity minus this margin.",
    )


class Thresholds(_Strict):
    default: float = Field(ge=0.0, le=1.0)
    operating_points: dict[str, OperatingPoint] = Field(default_factory=dict)


class Batching(_Strict):
    max_batch_size: int = Field(default=1, ge=1, le=4096)
    max_queue_delay_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    max_queue_size: int = Field(default=1024, ge=1)


class Runtime(_Strict):
    instance_count: int = Field(default=1, ge=1, le=16)
    execution_providers: tuple[ExecutionProvider, ...] = ("CPUExecutionProvider",)


class VersionPolicy(_Strict):
    policy: Literal["latest", "specific"] = "latest"
    latest_n: int = Field(default=1, ge=1)
    versions: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _specific_needs_versions(self) -> VersionPolicy:
        if self.policy == "specific" and not self.versions:
            msg = "policy 'specific' needs a non-empty 'versions' list"
            raise ValueError(msg)
        return self


class VersionEntry(_Strict):
    sha256: str
    created: str | None = None
    notes: str | None = None
    ood: OodSpec | None = Field(default=None, description="This version's out-of-distribution detector.")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256.match(value):
            msg = "sha256 must be 64 lower-case hex digits"
            raise ValueError(msg)
        return value


class ModelSpec(_Strict):
    """One model as declared in its ``model.toml``."""

    name: str
    task: Literal["classification"]
    description: str = ""
    intended_use: str = Field(min_length=1)
    not_for_clinical_use: bool
    card: str = "card.md"
    labels: tuple[str, ...] = Field(min_length=1)
    positive_label: str | None = None
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    thresholds: Thresholds | None = None
    batching: Batching = Batching()
    runtime: Runtime = Runtime()
    version_policy: VersionPolicy = VersionPolicy()
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    explain: ExplainSpec | None = None
    monitoring: Monitoring = Monitoring()
    versions: dict[str, VersionEntry] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            msg = "name must be lower-case letters, digits, '.', '_' or '-' (max 64)"
            raise ValueError(msg)
        return value

    @field_validator("versions")
    @classmethod
    def _version_keys(cls, value: dict[str, VersionEntry]) -> dict[str, VersionEntry]:
        bad = [v for v in value if not v.isdigit()]
        if bad:
            msg = f"version folders must be positive integers, got {bad}"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.positive_label is not None and self.positive_label not in self.labels:
            msg = f"positive_label {self.positive_label!r} is not one of labels"
            raise ValueError(msg)
        outputs = {o.name for o in self.outputs}
        if self.explain is not None and self.explain.output is not None and self.explain.output not in outputs:
            msg = f"explain.output {self.explain.output!r} is not one of outputs"
            raise ValueError(msg)
        for number, entry in self.versions.items():
            if entry.ood is not None and entry.ood.output is not None and entry.ood.output not in outputs:
                msg = f"versions.{number}.ood.output {entry.ood.output!r} is not one of outputs"
                raise ValueError(msg)
        if self.policy_versions_missing():
            msg = f"version_policy names versions not declared: {self.policy_versions_missing()}"
            raise ValueError(msg)
        return self

    def explains(self, method: str) -> ExplainSpec | None:
        """The declared explanation if it is of this kind (``shapley``, ``cam``), else None."""
        return self.explain if self.explain is not None and self.explain.method == method else None

    def ood_of(self, version: str) -> OodSpec | None:
        """The out-of-distribution detector of one version, if it declares one."""
        entry = self.versions.get(version)
        return entry.ood if entry is not None else None

    def policy_versions_missing(self) -> list[str]:
        return [v for v in self.version_policy.versions if v not in self.versions]

    def served_versions(self) -> list[str]:
        """Versions the policy asks to serve, oldest first."""
        if self.version_policy.policy == "specific":
            return sorted(self.version_policy.versions, key=int)
        ordered = sorted(self.versions, key=int)
        return ordered[-self.version_policy.latest_n :]


def load_spec(model_dir: Path) -> ModelSpec:
    """Read and validate ``<model_dir>/model.toml``.

    Raises :class:`ModelSpecError` naming the file and the failing field.
    """
    path = model_dir / "model.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelSpecError(f"{path}: missing") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"{path}: not valid TOML ({exc})") from exc
    try:
        spec = ModelSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ModelSpecError(f"{path}: {problems}") from exc
    if spec.name != model_dir.name:
        raise ModelSpecError(f"{path}: name {spec.name!r} differs from folder {model_dir.name!r}")
    return spec


def iter_model_dirs(repository: Path) -> Iterator[Path]:
    """Folders of the repository that declare a model, in name order."""
    if not repository.is_dir():
        return
    for child in sorted(repository.iterdir()):
        if child.is_dir() and (child / "model.toml").is_file():
            yield child
