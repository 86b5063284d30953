"""Outcome feedback and running performance: ``POST /v1/feedback`` and
``GET /v1/models/{name}/performance``. Translation only; :class:`FeedbackService` decides."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Request, status

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
    VersionPerformance,
)
from app.transport.http.bodies import authenticated_json, json_request_body
from app.transport.http.deps import ModelsReader, request_context, require
from app.transport.http.problems import COMMON_ERRORS, PROBLEM_BASE, PROBLEM_MEDIA_TYPE, problem_responses, status_for
from app.transport.http.routes_models import ModelName
from app.transport.http.schemas import (
    ConfusionOut,
    FeedbackOut,
    FeedbackRequest,
    ModelPerformanceOut,
    OperatingPointCheckOut,
    ProportionOut,
    VersionPerformanceOut,
)

router = APIRouter()
TAG: Final = "monitoring"


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


#: A feedback record is a few hundred bytes; a body this long is not one.
FEEDBACK_MAX_BYTES: Final = 16 * 1024

FeedbackDep = Annotated[FeedbackService, Depends(get_feedback)]
_feedback_writer = require(Scope.FEEDBACK_WRITE)
FeedbackWriter = Annotated[Principal, Depends(_feedback_writer)]
#: Read only once the caller holds ``feedback:write`` (the same dependency, resolved once).
FeedbackBody = Annotated[
    FeedbackRequest,
    Depends(
        authenticated_json(
            FeedbackRequest, _feedback_writer, lambda settings: min(settings.max_json_bytes, FEEDBACK_MAX_BYTES)
        )
    ),
]


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
    return FeedbackOut.model_validate(r, from_attributes=True).model_dump(mode="json")


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
    response_model=FeedbackOut,
    responses=FEEDBACK_ERRORS,
    openapi_extra=json_request_body(FeedbackRequest),
)
async def record_feedback(
    body: FeedbackBody, request: Request, service: FeedbackDep, principal: FeedbackWriter
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
