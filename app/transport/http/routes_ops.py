"""Operational endpoints for probes, Prometheus and problem-type documentation."""

from __future__ import annotations

import inspect
from typing import Annotated, Final

from fastapi import APIRouter, Depends, Path, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import RouteNotFoundError
from app.transport.http.deps import ContainerDep, metrics_access
from app.transport.http.problems import COMMON_ERRORS, ERRORS_BY_CODE, problem_responses, status_for
from app.transport.http.schemas import Liveness, ModelVersionStatus, ProblemType, ReadinessReport

router = APIRouter()
TAG: Final = "operations"


@router.get(
    "/livez",
    operation_id="getLiveness",
    tags=[TAG],
    summary="Liveness probe",
    description="The process is up and its event loop answers. Checks nothing else, on purpose.",
    responses={**problem_responses(*COMMON_ERRORS)},
)
async def livez() -> Liveness:
    return Liveness(status="ok")


@router.get(
    "/readyz",
    operation_id="getReadiness",
    response_model=ReadinessReport,
    tags=[TAG],
    summary="Readiness probe",
    description=(
        "200 when the database answers and the model repository has finished loading with at least one "
        "model serving, or with every version not serving refused by the production gate (a "
        "not-for-clinical-use version that MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS does not name: a policy, "
        "not a fault); 503 with the same body otherwise. `models` lists each version and, for refused ones, "
        "the error code (for example `model-integrity`, or `model-not-acknowledged`) and why."
    ),
    responses={
        503: {
            "description": "Not ready",
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/ReadinessReport"},
                    "example": {"ready": False, "checks": {"database": False, "models": True}, "models": []},
                }
            },
        },
        **problem_responses(*COMMON_ERRORS),
    },
)
async def readyz(container: ContainerDep) -> JSONResponse:
    state = await container.readiness()
    report = ReadinessReport(
        ready=state.ready,
        checks={"database": state.database, "models": state.models_loaded},
        models=[ModelVersionStatus.of(s) for s in state.models],
    )
    return JSONResponse(report.model_dump(mode="json"), status_code=200 if state.ready else 503)


@router.get(
    "/metrics",
    operation_id="getMetrics",
    tags=[TAG],
    summary="Prometheus metrics",
    description=(
        "Prometheus text exposition format. Labels never carry patient, study or request identifiers. "
        "Open by default; with `MEDINFER_METRICS_REQUIRE_SCOPE=true` it needs scope `metrics:read`."
    ),
    response_class=Response,
    responses={
        200: {
            "content": {
                CONTENT_TYPE_LATEST.split(";")[0]: {
                    "schema": {"type": "string"},
                    "example": 'medinfer_http_requests_total{method="GET",route="/livez",status="200"} 3.0\n',
                }
            }
        },
        **problem_responses(401, 403, *COMMON_ERRORS),
    },
)
async def metrics(container: ContainerDep, _access: Annotated[None, Depends(metrics_access)]) -> Response:
    if container.pipeline.monitor is not None:
        container.pipeline.monitor.publish()  # drift gauges as of this scrape, not up to a second old
    return Response(container.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/problems/{code}",
    operation_id="getProblemType",
    tags=[TAG],
    summary="Describe a problem type",
    description="The `type` of every problem+json response resolves here: what the code means and how to recover.",
    responses={**problem_responses(404, 422, *COMMON_ERRORS)},
)
async def problem_type(
    code: str = Path(max_length=64, pattern=r"^[a-z0-9-]+$", examples=["model-integrity"]),
) -> ProblemType:
    error = ERRORS_BY_CODE.get(code)
    if error is None:
        raise RouteNotFoundError(f"no problem type {code!r}")
    return ProblemType(
        code=error.code,
        title=error.title,
        status=status_for(error),
        description=inspect.cleandoc(error.__doc__ or error.title),
    )


@router.get(
    "/.well-known/jwks.json",
    operation_id="getJwks",
    tags=[TAG],
    summary="The service's public encryption keys",
    description=(
        "JSON Web Key Set (RFC 7517) of the keys clients encrypt payloads to: the active key and the one "
        "published next, each with `kid`, `use: enc` and `alg`. No authentication."
    ),
    responses={
        200: {
            "content": {
                "application/jwk-set+json": {
                    "schema": {"type": "object"},
                    "example": {
                        "keys": [
                            {
                                "kty": "EC",
                                "crv": "P-256",
                                "x": "OD7YzNa5XYrP5FQEFTAQUtsYVXKvGvO310b5nbZm27M",
                                "y": "i3NECPa1FhfLLlc7kvzkSelE7Ap3QPDkQc60IgSGsQY",
                                "kid": "medinfer-20261128T124008Z-dacc2685",
                                "use": "enc",
                                "alg": "ECDH-ES+A256KW",
                            }
                        ]
                    },
                }
            }
        },
        **problem_responses(*COMMON_ERRORS),
    },
    response_class=Response,
)
async def jwks(container: ContainerDep) -> JSONResponse:
    return JSONResponse(container.keys.jwks(), media_type="application/jwk-set+json")
