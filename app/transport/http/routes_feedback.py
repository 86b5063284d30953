"""Outcome feedback and running performance: ``POST /v1/feedback`` and
``GET /v1/models/{name}/performance``. Translation only; :class:`FeedbackService` decides."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, ConfigDict, Field

from app.domain import Principal, Scope
from app.errors import FeedbackConflictError, MedinferError, ResultNotFoundError
from app.feedback import (
    Confusion,
    FeedbackRecord,
    FeedbackService,
    Interval,
    ModelPerformance,
    OperatingPointCheck,
    Outcome,
    Reason,
    VersionPerformance,
)
from app.transport.http.deps import JsonBody, ModelsReader, request_context, require
from app.transport.http.problems import COMMON_ERRORS, PROBLEM_BASE, PROBLEM_MEDIA_TYPE, problem_responses, status_for
from app.transport.http.routes_models import ModelName

router = APIRouter()
TAG: Final = "monitoring"

#: The request id of the example: ``tests/api/test_feedback.py`` predicts under it and then sends
#: this example as it stands, so the documented body is one that works.
EXAMPLE_REQUEST_ID: Final = "5f0c1e2a-7b3d-4c8e-9a61-0d2f4b6e8a10"
_SHA256_EXAMPLE: Final = "cc1d5a7f5975e1ae696837d4c3f65d676982cb637375a4061af6259f2e5f12f7"


def _documented(error: type[MedinferError], detail: str) -> dict[int | str, dict[str, Any]]:
    """This operation's own example for a status whose shared example names another error."""
    (entry,) = problem_responses(status_for(error)).values()
    example = entry["content"][PROBLEM_MEDIA_TYPE]["example"]
    example.update(type=PROBLEM_BASE + error.code, title=error.title, code=error.code, detail=detail)
    example.update(instance="/v1/feedback")
    return {status_for(error): entry}


FEEDBACK_ERRORS: Final = {
    **problem_responses(400, 401, 403, 415, 422, 503, *COMMON_ERRORS),
    **_documented(ResultNotFoundError, "no inference result has this request id"),
    **_documented(FeedbackConflictError, "an outcome is already recorded for this result"),
}


def get_feedback(request: Request) -> FeedbackService:
    service: FeedbackService = request.app.state.feedback
    return service


FeedbackDep = Annotated[FeedbackService, Depends(get_feedback)]
FeedbackWriter = Annotated[Principal, Depends(require(Scope.FEEDBACK_WRITE))]


class FeedbackRequest(BaseModel):
    """A confirmed outcome for one result. No free text: it could hold PHI."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "request_id": EXAMPLE_REQUEST_ID,
                "verdict": "disagree",
                "confirmed_label": "no_cad",
                "reason": "angiography",
                "model": "ehr-heart-disease",
            }
        },
    )

    request_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="The `request_id` of the prediction answer (its `X-Request-ID`).",
    )
    verdict: Literal["agree", "disagree", "label"] = Field(
        description="`agree`: the decided label was right. `disagree`: it was wrong (a two-label model's other "
        "label is implied). `label`: the confirmed label, whatever was decided."
    )
    confirmed_label: str | None = Field(
        default=None, max_length=64, description="One of the model's labels; required with `label`."
    )
    reason: Reason | None = Field(default=None, description="How the outcome was confirmed.")
    model: str | None = Field(
        default=None, max_length=64, description="If given, the result must be of this model (else 404)."
    )


class ProportionOut(BaseModel):
    """A proportion with its Wilson score 95 % confidence interval."""

    value: float
    ci95_low: float
    ci95_high: float
    successes: int
    total: int


class ConfusionOut(BaseModel):
    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int
    sensitivity: ProportionOut | None
    specificity: ProportionOut | None


class OperatingPointCheckOut(BaseModel):
    name: str
    threshold: float
    claimed_sensitivity: float | None
    claimed_specificity: float | None
    split: str | None = Field(description="The data the claim was measured on (model.toml).")
    sensitivity_floor: float | None = Field(description="Claimed sensitivity minus the model's margin.")
    confirmed: ConfusionOut = Field(description="Confirmed cases with their probability thresholded here.")


class VersionPerformanceOut(BaseModel):
    version: str
    confirmed_cases: int
    confirmed_by_label: dict[str, int]
    as_decided: ConfusionOut = Field(description="Each result counted at the operating point it was decided at.")
    calibration_error: float | None = Field(description="Expected calibration error, 10 equal-width bins.")
    monitored_operating_point: str | None = Field(
        description="The declared operating point at the default threshold: the alert compares against its floor."
    )
    below_floor: bool | None
    operating_points: list[OperatingPointCheckOut]


_COUNTS: Final[dict[str, Any]] = {"true_positive": 4, "false_negative": 1, "true_negative": 3, "false_positive": 2}
_CONFUSION_EXAMPLE: Final[dict[str, Any]] = {
    **_COUNTS,
    "sensitivity": {"value": 0.8, "ci95_low": 0.3755, "ci95_high": 0.9638, "successes": 4, "total": 5},
    "specificity": {"value": 0.6, "ci95_low": 0.2307, "ci95_high": 0.8824, "successes": 3, "total": 5},
}


class ModelPerformanceOut(BaseModel):
    """Running performance of each version over outcomes confirmed so far."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "model": "ehr-heart-disease",
                "positive_label": "cad",
                "sensitivity_margin": 0.1,
                "versions": [
                    {
                        "version": "1",
                        "confirmed_cases": 10,
                        "confirmed_by_label": {"no_cad": 5, "cad": 5},
                        "as_decided": _CONFUSION_EXAMPLE,
                        "calibration_error": 0.2415,
                        "monitored_operating_point": "high_sensitivity",
                        "below_floor": False,
                        "operating_points": [
                            {
                                "name": "high_sensitivity",
                                "threshold": 0.4541,
                                "claimed_sensitivity": 0.8611,
                                "claimed_specificity": 0.7083,
                                "split": "validation",
                                "sensitivity_floor": 0.7611,
                                "confirmed": _CONFUSION_EXAMPLE,
                            }
                        ],
                    }
                ],
            }
        }
    )

    model: str
    positive_label: str | None
    sensitivity_margin: float
    versions: list[VersionPerformanceOut]


class FeedbackOut(BaseModel):
    """The stored outcome: label names, numbers from the result's audit event, the client id."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "request_id": EXAMPLE_REQUEST_ID,
                "model": "ehr-heart-disease",
                "version": "1",
                "model_sha256": _SHA256_EXAMPLE,
                "probability": 0.87,
                "decided_label": "cad",
                "threshold": 0.4541,
                "operating_point": "default",
                "confirmed_label": "no_cad",
                "verdict": "disagree",
                "reason": "angiography",
                "recorded_by": "his-epic-prod",
                "recorded_at": "2026-12-04T16:20:00Z",
            }
        }
    )

    request_id: str
    model: str
    version: str
    model_sha256: str
    probability: float | None = Field(description="The positive label's probability in the result.")
    decided_label: str
    threshold: float | None
    operating_point: str | None
    confirmed_label: str
    verdict: Literal["agree", "disagree", "label"]
    reason: Reason | None
    recorded_by: str
    recorded_at: datetime


def _proportion(interval: Interval | None) -> ProportionOut | None:
    if interval is None:
        return None
    return ProportionOut(
        value=interval.value,
        ci95_low=interval.low,
        ci95_high=interval.high,
        successes=interval.successes,
        total=interval.total,
    )


def _confusion(c: Confusion) -> ConfusionOut:
    return ConfusionOut(
        true_positive=c.true_positive,
        false_negative=c.false_negative,
        true_negative=c.true_negative,
        false_positive=c.false_positive,
        sensitivity=_proportion(c.sensitivity),
        specificity=_proportion(c.specificity),
    )


def _check(check: OperatingPointCheck) -> OperatingPointCheckOut:
    return OperatingPointCheckOut(
        name=check.name,
        threshold=check.threshold,
        claimed_sensitivity=check.claimed_sensitivity,
        claimed_specificity=check.claimed_specificity,
        split=check.split,
        sensitivity_floor=check.sensitivity_floor,
        confirmed=_confusion(check.confusion),
    )


def _version(v: VersionPerformance) -> VersionPerformanceOut:
    return VersionPerformanceOut(
        version=v.version,
        confirmed_cases=v.confirmed,
        confirmed_by_label=dict(v.by_label),
        as_decided=_confusion(v.confusion),
        calibration_error=v.calibration_error,
        monitored_operating_point=v.monitored.name if v.monitored else None,
        below_floor=v.below_floor,
        operating_points=[_check(c) for c in v.operating_points],
    )


def _performance(p: ModelPerformance) -> ModelPerformanceOut:
    return ModelPerformanceOut(
        model=p.model,
        positive_label=p.positive_label,
        sensitivity_margin=p.sensitivity_margin,
        versions=[_version(v) for v in p.versions],
    )


def _record(r: FeedbackRecord) -> dict[str, Any]:
    return FeedbackOut(
        request_id=r.request_id,
        model=r.model,
        version=r.version,
        model_sha256=r.model_sha256,
        probability=r.probability,
        decided_label=r.decided_label,
        threshold=r.threshold,
        operating_point=r.operating_point,
        confirmed_label=r.confirmed_label,
        verdict=r.verdict,
        reason=r.reason,
        recorded_by=r.recorded_by,
        recorded_at=r.recorded_at,
    ).model_dump(mode="json")


@router.post(
    "/v1/feedback",
    operation_id="recordFeedback",
    tags=[TAG],
    summary="Record the confirmed outcome of a result",
    description=(
        "Names a result by the `request_id` of its prediction answer and says whether the confirmed finding "
        "agrees with it. The result is read back from its audit event, so the stored record (no PHI, no free "
        "text) holds the decided label, probability, threshold and operating point it was given at. Once per "
        "result: a second outcome is 409 and nothing is stored twice; a result that failed or was "
        "indeterminate has no label to judge (409); an unknown request id is 404. Audited. "
        "Send `application/json`. Scope `feedback:write`."
    ),
    status_code=status.HTTP_201_CREATED,
    dependencies=[JsonBody],
    response_model=FeedbackOut,
    responses=FEEDBACK_ERRORS,
)
async def record_feedback(
    body: FeedbackRequest, request: Request, service: FeedbackDep, principal: FeedbackWriter
) -> dict[str, Any]:
    outcome = Outcome(
        request_id=body.request_id,
        verdict=body.verdict,
        confirmed_label=body.confirmed_label,
        reason=body.reason,
        model=body.model,
    )
    return _record(await service.record(outcome, request_context(request, principal)))


@router.get(
    "/v1/models/{name}/performance",
    operation_id="getModelPerformance",
    tags=[TAG],
    summary="Running performance over confirmed outcomes",
    description=(
        "Per version: confirmed cases by label; true/false positives and negatives as each result was decided; "
        "sensitivity and specificity with Wilson 95 % intervals; expected calibration error (10 bins); and, for "
        "each declared operating point, its claimed figures and data split from model.toml beside the confirmed "
        "cases thresholded there, with the alert floor (claimed sensitivity minus the model's margin). "
        "Database-wide: every replica answers the same. Scope `models:read`."
    ),
    responses={**problem_responses(401, 403, 404, 503, *COMMON_ERRORS)},
)
async def get_model_performance(name: ModelName, service: FeedbackDep, _principal: ModelsReader) -> ModelPerformanceOut:
    return _performance(await service.performance(name))
