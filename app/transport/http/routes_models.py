"""Read-only model catalogue: what serves, with the provenance every result cites."""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Path

from app.inference.registry import ModelRegistry
from app.inference.spec import ModelSpec, OodSpec
from app.transport.http.deps import ContainerDep, ModelsReader
from app.transport.http.problems import COMMON_ERRORS, problem_responses
from app.transport.http.schemas import (
    ModelList,
    ModelSummary,
    ModelVersionSummary,
    OodDetector,
    OperatingPoint,
    TensorMetadata,
)

router = APIRouter(prefix="/v1/models")
TAG: Final = "models"
ModelName = Annotated[
    str, Path(max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$", examples=["cxr-pneumonia", "ehr-heart-disease"])
]


def summarise(registry: ModelRegistry, spec: ModelSpec) -> ModelSummary:
    return ModelSummary(
        name=spec.name,
        task=spec.task,
        description=spec.description,
        intended_use=spec.intended_use,
        not_for_clinical_use=spec.not_for_clinical_use,
        labels=list(spec.labels),
        positive_label=spec.positive_label,
        default_threshold=spec.thresholds.default if spec.thresholds else None,
        operating_points={
            name: OperatingPoint(**point.model_dump())
            for name, point in (spec.thresholds.operating_points.items() if spec.thresholds else ())
        },
        inputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in spec.inputs],
        outputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in spec.outputs],
        versions=[
            ModelVersionSummary(
                version=sv.version,
                sha256=sv.sha256,
                providers=list(sv.loaded.providers),
                ood=_detector(spec.ood_of(sv.version)),
            )
            for sv in registry.served_versions(spec.name)
        ],
    )


def _detector(ood: OodSpec | None) -> OodDetector | None:
    if ood is None:
        return None
    return OodDetector(
        method=ood.method,
        output=ood.output,
        threshold=ood.threshold,
        in_distribution_flagged=ood.in_distribution_flagged,
        training_ranges={name: list(bounds) for name, bounds in ood.training_ranges.items()},
        max_imputed=ood.max_imputed,
    )


@router.get(
    "",
    operation_id="listModels",
    tags=[TAG],
    summary="List serving models",
    description="Every model of the repository that is loaded, with its serving versions. Scope `models:read`.",
    responses={**problem_responses(401, 403, *COMMON_ERRORS)},
)
async def list_models(container: ContainerDep, _principal: ModelsReader) -> ModelList:
    registry = container.registry
    return ModelList(models=[summarise(registry, spec) for spec in registry.specs()])


@router.get(
    "/{name}",
    operation_id="getModel",
    tags=[TAG],
    summary="Describe one model",
    description="Metadata, intended use, thresholds and serving versions of one model. Scope `models:read`.",
    responses={**problem_responses(401, 403, 404, 422, 503, *COMMON_ERRORS)},
)
async def get_model(name: ModelName, container: ContainerDep, _principal: ModelsReader) -> ModelSummary:
    registry = container.registry
    registry.get(name)  # raises not-found / not-ready with the right problem
    spec = next(s for s in registry.specs() if s.name == name)
    return summarise(registry, spec)
