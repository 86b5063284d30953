"""``POST /v1/models/{name}/predict``: domain payloads in, a decision with provenance out.

Today it takes EHR records (a FHIR R4 Bundle, or plain JSON features); DICOM studies come with
the imaging path. ``Accept: application/fhir+json`` answers a FHIR RiskAssessment.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Final

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from app.encoders.fhir import risk_assessment
from app.encoders.json import prediction
from app.errors import NotAcceptableError, UnsupportedMediaTypeError
from app.transport.http.deps import (
    ContainerDep,
    Inferrer,
    media_type_of,
    read_payload,
    request_context,
    request_deadline,
    sealed_response,
)
from app.transport.http.problems import COMMON_ERRORS, problem_responses
from app.transport.http.routes_models import ModelName
from app.transport.http.schemas import PREDICTION_EXAMPLE, RISK_ASSESSMENT_EXAMPLE, SEALED_EXAMPLE

router = APIRouter(prefix="/v1/models")
TAG: Final = "predict"
FHIR_JSON: Final = "application/fhir+json"

BUNDLE_EXAMPLE: Final = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [
        {
            "fullUrl": "urn:uuid:5b7c2a3e-0f3d-4c55-9b8e-0b1b5e9f0a01",
            "resource": {
                "resourceType": "Patient",
                "id": "p1",
                "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-12345"}],
                "gender": "male",
                "birthDate": "1961-04-02",
            },
        },
        {
            "resource": {
                "resourceType": "Observation",
                "id": "bp1",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "subject": {"reference": "Patient/p1"},
                "effectiveDateTime": "2024-05-01T09:30:00Z",
                "valueQuantity": {
                    "value": 145,
                    "unit": "mmHg",
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]",
                },
            }
        },
    ],
}
FEATURES_EXAMPLE: Final = {
    "features": {
        "age": 63, "sex": "male", "cp": "typical-angina", "trestbps": 145, "chol": 233, "fbs": 1, "restecg": 2,
        "thalach": 150, "exang": 0, "oldpeak": 2.3, "slope": 3, "ca": 0, "thal": 6,
    }
}  # fmt: skip

_OPENAPI: Final = {
    "requestBody": {
        "required": True,
        "description": "A FHIR R4 Bundle (collection or transaction) with one Patient and its Observations, "
        "or plain JSON features by name (numbers, or codes from the model's code tables).",
        "content": {
            FHIR_JSON: {"schema": {"type": "object", "title": "FHIR R4 Bundle"}, "example": BUNDLE_EXAMPLE},
            "application/json": {
                "schema": {
                    "type": "object",
                    "title": "Features",
                    "required": ["features"],
                    "properties": {
                        "features": {
                            "type": "object",
                            "additionalProperties": {"type": ["number", "string", "boolean", "null"]},
                        }
                    },
                },
                "example": FEATURES_EXAMPLE,
            },
        },
    }
}


@router.post(
    "/{name}/predict",
    operation_id="predict",
    tags=[TAG],
    summary="Predict from a patient record",
    description=(
        "Maps the record to the model's features (LOINC codes, UCUM units, code tables in `model.toml`), "
        "runs the model, and answers probabilities and the decision at the operating point, with the model's "
        "name, version, sha256 and intended use. Missing features are refused (422 listing them) or imputed "
        "and flagged, per the model's policy. `Accept: application/fhir+json` answers a FHIR RiskAssessment "
        "whose `probabilityDecimal` is a percentage, as R4 defines it. Scope `infer`."
    ),
    openapi_extra=_OPENAPI,
    responses={
        200: {
            "description": "The prediction",
            "content": {
                "application/json": {"schema": {"type": "object"}, "example": PREDICTION_EXAMPLE},
                FHIR_JSON: {"schema": {"type": "object"}, "example": RISK_ASSESSMENT_EXAMPLE},
                "application/jose": {"schema": {"type": "string"}, "example": SEALED_EXAMPLE},
            },
        },
        **problem_responses(400, 401, 403, 404, 406, 413, 415, 422, 429, 503, 504, *COMMON_ERRORS),
    },
    response_class=Response,
)
async def predict(
    name: ModelName,
    request: Request,
    container: ContainerDep,
    principal: Inferrer,
    operating_point: Annotated[str | None, Query(max_length=64, examples=["high_sensitivity"])] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    wants = media_type_of(accept)
    if wants not in {"", "*/*", "application/json", FHIR_JSON, "application/*", "application/jose"}:
        raise NotAcceptableError("answers are application/json or application/fhir+json")
    payload = await read_payload(request, container, principal)
    media = media_type_of(payload.media_type)
    if media not in {FHIR_JSON, "application/json"}:
        raise UnsupportedMediaTypeError("send application/fhir+json (a Bundle) or application/json (features)")
    body = payload.body
    context = request_context(request, principal, hashlib.sha256(body).hexdigest())
    result = await container.pipeline.predict_record(
        name,
        body=body,
        kind="fhir" if media == FHIR_JSON else "features",
        deadline=request_deadline(request, container.settings),
        context=context,
        operating_point=operating_point,
    )
    served, classification, features = result.served, result.classification, result.features
    if wants == FHIR_JSON:
        resource = risk_assessment(
            served,
            classification,
            patient_reference=features.patient_reference,
            observation_ids=features.observation_ids,
            request_id=context.request_id,
        )
        return JSONResponse(resource, media_type=FHIR_JSON)
    summary: dict[str, Any] = {
        "kind": "fhir" if media == FHIR_JSON else "features",
        "patient": features.patient_reference,
        "observations": features.observation_ids,
        "imputed": features.imputed,
    }
    answer = prediction(served, classification, request_id=context.request_id, input_summary=summary)
    if wants == "application/jose":
        return sealed_response(principal, json.dumps(answer).encode(), "application/json")
    return JSONResponse(answer)
