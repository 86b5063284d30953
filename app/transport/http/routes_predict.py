"""``POST /v1/models/{name}/predict``: domain payloads in, a decision with provenance out.

It takes EHR records (a FHIR R4 Bundle, or plain JSON features) and DICOM images (one
``application/dicom`` instance, or a series as ``multipart/related; type="application/dicom"``),
plain or as JWE. ``Accept: application/fhir+json`` answers a FHIR RiskAssessment for records;
``Accept: application/dicom`` answers the DICOM SR for images.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from app.config import service_version
from app.container import Container
from app.domain import Principal, RequestContext
from app.encoders.dicom_sr import build_sr, sr_bytes
from app.encoders.explanation import explanation_fhir, explanation_json
from app.encoders.fhir import risk_assessment
from app.encoders.json import features_used, prediction, shown_probabilities, validated_input
from app.encoders.saliency import overlay_png
from app.errors import InferenceFailedError, NotAcceptableError, PayloadTooLargeError, UnsupportedMediaTypeError
from app.imaging.service import dicom_limits
from app.parsing.dicom import DicomInstance, DicomLimits, read_instance
from app.pipeline import StudyPrediction
from app.transport.http.deps import (
    ContainerDep,
    Inferrer,
    Payload,
    media_type_of,
    read_payload,
    request_context,
    request_deadline,
    sealed_response,
)
from app.transport.http.multipart import iter_parts, parse_related
from app.transport.http.problems import COMMON_ERRORS, problem_responses
from app.transport.http.routes_models import ModelName
from app.transport.http.schemas import (
    INDETERMINATE_EXAMPLE,
    PREDICTION_EXAMPLE,
    RISK_ASSESSMENT_EXAMPLE,
    SEALED_EXAMPLE,
    SEALED_REQUEST_CONTENT,
)

router = APIRouter(prefix="/v1/models")
TAG: Final = "predict"
FHIR_JSON: Final = "application/fhir+json"
DICOM: Final = "application/dicom"
MULTIPART_RELATED: Final = "multipart/related"
DICOM_EXAMPLE: Final = "<binary: 128-byte preamble, 'DICM', File Meta Information, CR/DX image data set>"
MULTIPART_EXAMPLE: Final = (
    "--b1\r\nContent-Type: application/dicom\r\n\r\n<DICOM Part 10 bytes>\r\n"
    "--b1\r\nContent-Type: application/dicom\r\n\r\n<DICOM Part 10 bytes>\r\n--b1--\r\n"
)
SR_EXAMPLE: Final = "<binary: DICOM Comprehensive 3D SR (TID 1500), VerificationFlag UNVERIFIED>"
PNG: Final = "image/png"
ANSWERS: Final = frozenset({"", "*/*", "application/json", FHIR_JSON, "application/*", "application/jose", DICOM, PNG})

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
        "plain JSON features by name (numbers, or codes from the model's code tables), one DICOM Part 10 "
        'instance, or a series of one study as multipart/related; type="application/dicom". Any of them may '
        "come as a JWE (application/jose) whose `cty` names the inner media type.",
        "content": {
            DICOM: {
                "schema": {"type": "string", "format": "binary", "title": "DICOM Part 10 instance"},
                "example": DICOM_EXAMPLE,
            },
            MULTIPART_RELATED: {
                "schema": {"type": "string", "format": "binary", "title": "DICOM series (multipart/related)"},
                "example": MULTIPART_EXAMPLE,
            },
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
            **SEALED_REQUEST_CONTENT,
        },
    }
}


def _is_json(media: str) -> bool:
    """A record (features or FHIR), not a JWE in its JSON serialization (``application/jose+json``)."""
    return media in {"application/json", FHIR_JSON}


@router.post(
    "/{name}/predict",
    operation_id="predict",
    tags=[TAG],
    summary="Predict from a patient record or a DICOM study",
    description=(
        "Records: maps the record to the model's features (LOINC codes, UCUM units, code tables in `model.toml`), "
        "runs the model, and answers probabilities and the decision at the operating point, with the model's "
        "name, version, sha256 and intended use. Missing features are refused (422 listing them) or imputed "
        "and flagged, per the model's policy. `Accept: application/fhir+json` answers a FHIR RiskAssessment "
        "whose `probabilityDecimal` is a percentage, as R4 defines it. Each answer lists the features the model "
        "used (value, unit, source resource, imputed).\n\n"
        "Images: one DICOM Part 10 instance (`application/dicom`) or a series of one study "
        '(`multipart/related; type="application/dicom"`). Each instance is checked against the model\'s '
        "allow-lists (SOP Class, Modality, BodyPartExamined, ViewPosition, PhotometricInterpretation) and size "
        "caps before any pixel is decoded. The answer names the Study, Series and SOP Instance UIDs read, each "
        "instance's probabilities, the study's decision (its most suspicious image) and the time spent. "
        "`Accept: application/dicom` answers the DICOM SR (Comprehensive 3D SR, TID 1500, UNVERIFIED) instead, "
        "`Accept: application/fhir+json` a RiskAssessment whose basis is the ImagingStudy (by its Study "
        "Instance UID). With `explain=true` the JSON answer carries the class activation map of the most "
        "suspicious image as a PNG overlay (`explanation.overlay_png`, a data URL), and `Accept: image/png` "
        "answers that PNG alone.\n\n"
        "Input outside the model's validated input (its out-of-distribution detector, declared per version) is "
        'answered 200 with `decision.label` "indeterminate", `probabilities` null and `validated_input` giving '
        "the score, threshold and reasons: never a label. Scope `infer`."
    ),
    openapi_extra=_OPENAPI,
    responses={
        200: {
            "description": "The prediction",
            "content": {
                "application/json": {
                    "schema": {"type": "object"},
                    "examples": {
                        "decision": {"summary": "A decision", "value": PREDICTION_EXAMPLE},
                        "indeterminate": {
                            "summary": "Input outside the model's validated input: no label",
                            "value": INDETERMINATE_EXAMPLE,
                        },
                    },
                },
                FHIR_JSON: {"schema": {"type": "object"}, "example": RISK_ASSESSMENT_EXAMPLE},
                DICOM: {"schema": {"type": "string", "format": "binary"}, "example": SR_EXAMPLE},
                PNG: {
                    "schema": {"type": "string", "format": "binary"},
                    "example": "(PNG bytes: the most suspicious image as the model saw it, under its activation map)",
                },
                "application/jose": {"schema": {"type": "string"}, "example": SEALED_EXAMPLE},
            },
        },
        **problem_responses(400, 401, 403, 404, 406, 409, 413, 415, 422, 429, 503, 504, *COMMON_ERRORS),
    },
    response_class=Response,
)
async def predict(
    name: ModelName,
    request: Request,
    container: ContainerDep,
    principal: Inferrer,
    operating_point: Annotated[str | None, Query(max_length=64, examples=["high_sensitivity"])] = None,
    *,
    explain: Annotated[
        bool,
        Query(
            description="Explain the result: per-feature Shapley contributions for records, a class activation "
            "map for images (the model must declare `[explain]`; otherwise 422). Audited.",
        ),
    ] = False,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    wants = media_type_of(accept)
    if wants not in ANSWERS:
        raise NotAcceptableError("answers are application/json, application/fhir+json or application/dicom")
    json_cap = container.settings.max_json_bytes
    declared = request.headers.get("content-length", "")
    if _is_json(media_type_of(request.headers.get("content-type"))) and declared.isdigit() and int(declared) > json_cap:
        # A record is kilobytes: refused by its declared length, before a byte is read.
        raise PayloadTooLargeError(f"a JSON record exceeds the {json_cap}-byte limit")
    payload = await read_payload(request, container, principal)
    media = media_type_of(payload.media_type)
    if _is_json(media) and len(payload.body) > json_cap:  # sent without a length, or inside a JWE
        raise PayloadTooLargeError(f"a JSON record exceeds the {json_cap}-byte limit")
    if media in {DICOM, MULTIPART_RELATED}:
        return await _predict_images(
            name, request, container, principal, payload, wants, operating_point, explain=explain
        )
    if media not in {FHIR_JSON, "application/json"}:
        raise UnsupportedMediaTypeError(
            "send application/fhir+json (a Bundle), application/json (features), application/dicom (an image) "
            'or multipart/related; type="application/dicom" (a series)'
        )
    if wants in {DICOM, PNG}:
        raise NotAcceptableError(f"{wants} answers are for DICOM images")
    body = payload.body
    context = request_context(request, principal, hashlib.sha256(body).hexdigest())
    result = await container.pipeline.predict_record(
        name,
        body=body,
        kind="fhir" if media == FHIR_JSON else "features",
        deadline=request_deadline(request, container.settings),
        context=context,
        operating_point=operating_point,
        explain=explain,
    )
    served, classification, features = result.served, result.classification, result.features
    label = served.spec.positive_label
    if wants == FHIR_JSON:
        resource = risk_assessment(
            served,
            classification,
            patient_reference=features.patient_reference,
            observation_ids=features.observation_ids,
            used=features.used,
            request_id=context.request_id,
        )
        if result.explanation is not None:
            extensions, note = explanation_fhir(result.explanation, label=label)
            resource.setdefault("extension", []).extend(extensions)
            resource["note"].append(note)
        return JSONResponse(resource, media_type=FHIR_JSON)
    summary: dict[str, Any] = {
        "kind": "fhir" if media == FHIR_JSON else "features",
        "patient": features.patient_reference,
        "observations": features.observation_ids,
        "imputed": features.imputed,
        "features": features_used(features.used),
    }
    answer = prediction(served, classification, request_id=context.request_id, input_summary=summary)
    if result.explanation is not None:
        answer["explanation"] = explanation_json(result.explanation, label=label)
    return _answer(principal, answer, wants)


def _answer(principal: Principal, answer: dict[str, Any], wants: str) -> Response:
    if wants == "application/jose":
        return sealed_response(principal, json.dumps(answer).encode(), "application/json")
    return JSONResponse(answer)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _instances(payload: Payload, container: Container, limits: DicomLimits) -> list[DicomInstance]:
    media = media_type_of(payload.media_type)
    if media == DICOM:
        blobs = [payload.body]
    else:
        related = parse_related(payload.media_type)
        if related.type not in {"", DICOM}:
            raise UnsupportedMediaTypeError('a series is multipart/related; type="application/dicom"')
        blobs = []
        async for part in iter_parts(
            _once(payload.body),
            related.boundary,
            max_part_bytes=limits.max_bytes,
            max_total_bytes=container.settings.max_body_bytes,
            max_parts=container.settings.dicom_max_parts,
        ):
            if part.content_type not in {"", DICOM}:
                raise UnsupportedMediaTypeError("every part of the series must be application/dicom")
            blobs.append(part.body)
    return await asyncio.to_thread(lambda: [read_instance(blob, limits) for blob in blobs])


async def _predict_images(
    name: str,
    request: Request,
    container: Container,
    principal: Principal,
    payload: Payload,
    wants: str,
    operating_point: str | None,
    *,
    explain: bool,
) -> Response:
    if wants == PNG and not explain:
        raise NotAcceptableError("image/png is the saliency overlay: ask for it with explain=true")
    context = request_context(request, principal, hashlib.sha256(payload.body).hexdigest())
    instances = await _instances(payload, container, dicom_limits(container.settings))
    result = await container.pipeline.predict_study(
        name,
        instances,
        deadline=request_deadline(request, container.settings),
        context=context,
        operating_point=operating_point,
        explain=explain,
    )
    if wants == DICOM:
        encoded = await asyncio.to_thread(_sr, instances, result, context)
        return Response(encoded, media_type=DICOM)
    if wants == FHIR_JSON:
        resource = risk_assessment(
            result.served,
            result.classification,
            patient_reference=None,
            observation_ids=[],
            request_id=context.request_id,
            imaging_study_uid=result.study_uid,
        )
        return JSONResponse(resource, media_type=FHIR_JSON)
    overlay = await asyncio.to_thread(_overlay, result) if explain else None
    if wants == PNG and overlay is not None:
        return Response(overlay, media_type=PNG)
    answer = prediction(
        result.served, result.classification, request_id=context.request_id, input_summary=_study_summary(result)
    )
    if overlay is not None:
        answer["explanation"] = _saliency_summary(result, overlay)
    answer["timing_ms"] = {
        "preprocess": round(result.preprocess_ms, 3),
        "queue": round(result.queue_ms, 3),
        "inference": round(result.inference_ms, 3),
    }
    return _answer(principal, answer, wants)


def _sr(instances: list[DicomInstance], result: StudyPrediction, context: RequestContext) -> bytes:
    sr = build_sr(
        [i.dataset for i in instances],
        result.served,
        result.classification,
        request_id=context.request_id or "",
        software_version=service_version(),
    )
    return sr_bytes(sr)


def _overlay(result: StudyPrediction) -> bytes:
    """The most suspicious image, preprocessed as the model saw it, under its activation map."""
    shown = result.most_suspicious
    if shown.image is None or shown.saliency is None:  # explain=true always keeps both
        raise InferenceFailedError("the model returned no activation map")
    return overlay_png(shown.image, shown.saliency)


def _saliency_summary(result: StudyPrediction, overlay: bytes) -> dict[str, Any]:
    spec = result.served.spec
    statement = (
        f"Class activation map for '{spec.positive_label}': where the model's evidence for that label lies in "
        "the image it was given (preprocessed), scaled to [0, 1]; it is not a probability or a lesion outline."
    )
    if result.classification.indeterminate:
        statement += " The input is outside the model's validated input, so the map is not evidence of anything."
    return {
        "method": "cam",
        "label": spec.positive_label,
        "sop_instance_uid": result.most_suspicious.sop_instance_uid,
        "overlay_png": "data:image/png;base64," + base64.b64encode(overlay).decode("ascii"),
        "statement": statement,
    }


def _study_summary(result: StudyPrediction) -> dict[str, Any]:
    return {
        "kind": "dicom",
        "study_instance_uid": result.study_uid,
        "series_instance_uids": sorted({i.series_uid for i in result.instances}),
        "sop_instance_uids": [i.sop_instance_uid for i in result.instances],
        "instances": [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "series_instance_uid": i.series_uid,
                "probabilities": shown_probabilities(i.classification),
                "label": i.classification.label,
                "validated_input": validated_input(i.classification.ood),
            }
            for i in result.instances
        ],
    }
