"""Open Inference Protocol v2 over HTTP: the paths and JSON shapes KServe and Triton clients use.

This route family answers errors as ``{"error": "..."}`` (the protocol's format) instead of
problem+json; ``problems.py`` chooses the format by path, with the same status table.

Every infer answer, and the model metadata, carries the model's provenance as ``parameters``
(``model_sha256``, ``not_for_clinical_use``, ``intended_use``): a v2 client sees which file
answered and whether it may inform care, as a v1 client does.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated, Any, Final

from fastapi import APIRouter, Header, Path, Request, Response

from app.config import service_version
from app.domain import Principal
from app.errors import MalformedBodyError, ModelNotFoundError, ModelNotReadyError, PayloadTooLargeError
from app.inference.registry import ServedVersion
from app.inference.spec import ModelSpec
from app.pipeline import INLINE_PARSE_BYTES
from app.transport.http.deps import (
    ContainerDep,
    Inferrer,
    ModelsReader,
    read_payload,
    request_context,
    request_deadline,
    sealed_response,
    wants_sealed,
)
from app.transport.http.problems import v2_error_responses
from app.transport.http.schemas import SEALED_EXAMPLE, SEALED_REQUEST_CONTENT
from app.transport.http.v2_codec import HEADER_LENGTH, deadline_from_parameters, decode_request, encode_response

_JSON_TOO_LARGE: Final = (
    "a JSON-only inference request exceeds the {}-byte limit; send large tensors with the binary tensor "
    "extension (Inference-Header-Content-Length)"
)

router = APIRouter(prefix="/v2")
TAG: Final = "open-inference-protocol"
ModelName = Annotated[
    str, Path(max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$", examples=["cxr-pneumonia", "ehr-heart-disease"])
]
Version = Annotated[str, Path(max_length=16, pattern=r"^[0-9]+$", examples=["1"])]

_INFER_EXAMPLE: Final = {
    "id": "42",
    "inputs": [
        {
            "name": "features",
            "shape": [1, 13],
            "datatype": "FP32",
            "data": [63, 1, 1, 145, 233, 1, 2, 150, 0, 2.3, 3, 0, 6],
        }
    ],
    "outputs": [{"name": "probabilities"}],
}
_PROVENANCE_EXAMPLE: Final = {
    "model_sha256": "cc1d5a7f5975e1ae696837d4c3f65d676982cb637375a4061af6259f2e5f12f7",
    "not_for_clinical_use": True,
    "intended_use": "Demonstration and integration testing of medinfer's FHIR path. Not a medical device.",
}
_INFER_RESPONSE_EXAMPLE: Final = {
    "model_name": "ehr-heart-disease",
    "model_version": "1",
    "id": "42",
    "parameters": _PROVENANCE_EXAMPLE,
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.31, 0.69]}],
}


_METADATA_RESPONSE: Final = {
    "description": "Model metadata",
    "content": {
        "application/json": {
            "example": {
                "name": "ehr-heart-disease",
                "versions": ["1"],
                "platform": "onnxruntime_onnx",
                "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 13]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
                "parameters": _PROVENANCE_EXAMPLE,
            }
        }
    },
}


def provenance(served: ServedVersion) -> dict[str, Any]:
    """The response ``parameters`` naming the model behind an answer."""
    return {
        "model_sha256": served.sha256,
        "not_for_clinical_use": served.spec.not_for_clinical_use,
        "intended_use": served.spec.intended_use,
    }


def _tensor_meta(spec: ModelSpec) -> dict[str, Any]:
    return {
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in spec.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in spec.outputs],
    }


def _model_metadata(versions: list[ServedVersion], default: ServedVersion) -> dict[str, Any]:
    """The protocol's metadata, plus ``parameters``: the provenance of ``default``, the version
    an infer request without a version gets (MLServer's REST metadata has a parameters object
    too; tritonclient returns the body as a dict and ignores keys it does not know)."""
    return {
        "name": default.spec.name,
        "versions": [sv.version for sv in versions],
        "platform": "onnxruntime_onnx",
        **_tensor_meta(default.spec),
        "parameters": provenance(default),
    }


@router.get(
    "",
    operation_id="v2GetServerMetadata",
    tags=[TAG],
    summary="Server metadata",
    responses={
        200: {
            "description": "Server metadata",
            "content": {
                "application/json": {
                    "example": {"name": "medinfer", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
                }
            },
        },
        **v2_error_responses(401, 403, 500),
    },
)
async def server_metadata(_principal: ModelsReader) -> dict[str, Any]:
    return {"name": "medinfer", "version": service_version(), "extensions": ["binary_tensor_data"]}


@router.get(
    "/health/live",
    operation_id="v2GetServerLive",
    tags=[TAG],
    summary="Server liveness",
    response_class=Response,
    responses={200: {"description": "Live"}, **v2_error_responses(500)},
)
async def server_live() -> Response:
    return Response(status_code=200)


@router.get(
    "/health/ready",
    operation_id="v2GetServerReady",
    tags=[TAG],
    summary="Server readiness",
    description="200 when ready, 400 when not (as Triton answers).",
    response_class=Response,
    responses={200: {"description": "Ready"}, 400: {"description": "Not ready"}, **v2_error_responses(500)},
)
async def server_ready(container: ContainerDep) -> Response:
    return Response(status_code=200 if (await container.readiness()).ready else 400)


@router.get(
    "/models/{name}",
    operation_id="v2GetModelMetadata",
    tags=[TAG],
    summary="Model metadata",
    responses={200: _METADATA_RESPONSE, **v2_error_responses(401, 403, 404, 422, 500, 503)},
)
async def model_metadata(name: ModelName, container: ContainerDep, _principal: ModelsReader) -> dict[str, Any]:
    registry = container.registry
    served = registry.get(name)
    return _model_metadata(registry.served_versions(name), served)


@router.get(
    "/models/{name}/versions/{version}",
    operation_id="v2GetModelVersionMetadata",
    tags=[TAG],
    summary="Model version metadata",
    responses={200: _METADATA_RESPONSE, **v2_error_responses(401, 403, 404, 422, 500, 503)},
)
async def model_version_metadata(
    name: ModelName, version: Version, container: ContainerDep, _principal: ModelsReader
) -> dict[str, Any]:
    served = container.registry.get(name, version)
    return _model_metadata([served], served)


async def _ready(container: ContainerDep, name: str, version: str | None) -> Response:
    try:
        container.registry.get(name, version)
    except ModelNotReadyError:
        return Response(status_code=400)
    except ModelNotFoundError:
        raise
    return Response(status_code=200)


@router.get(
    "/models/{name}/ready",
    operation_id="v2GetModelReady",
    tags=[TAG],
    summary="Model readiness",
    response_class=Response,
    responses={
        200: {"description": "Ready"},
        400: {"description": "Not ready"},
        **v2_error_responses(401, 403, 404, 422, 500),
    },
)
async def model_ready(name: ModelName, container: ContainerDep, _principal: ModelsReader) -> Response:
    return await _ready(container, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    operation_id="v2GetModelVersionReady",
    tags=[TAG],
    summary="Model version readiness",
    response_class=Response,
    responses={
        200: {"description": "Ready"},
        400: {"description": "Not ready"},
        **v2_error_responses(401, 403, 404, 422, 500),
    },
)
async def model_version_ready(
    name: ModelName, version: Version, container: ContainerDep, _principal: ModelsReader
) -> Response:
    return await _ready(container, name, version)


_INFER_OPENAPI: Final = {
    "requestBody": {
        "required": True,
        "description": (
            "An inference request. With the binary tensor extension, send `Inference-Header-Content-Length` "
            "and append raw little-endian tensors after the JSON header, each announced by "
            "`parameters.binary_data_size`. The body may come as a JWE (application/jose) whose `cty` "
            "names its media type."
        ),
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}, "example": _INFER_EXAMPLE},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            **SEALED_REQUEST_CONTENT,
        },
    }
}
_INFER_RESPONSES: Final = {
    200: {
        "description": "Outputs, as JSON or (binary extension) a JSON header followed by raw tensors.",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/V2InferResponse"},
                "example": _INFER_RESPONSE_EXAMPLE,
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/jose": {"schema": {"type": "string"}, "example": SEALED_EXAMPLE},
        },
    },
    **v2_error_responses(400, 401, 403, 404, 413, 415, 422, 429, 500, 503, 504),
}


async def _infer(
    request: Request,
    container: ContainerDep,
    principal: Principal,
    name: str,
    version: str | None,
    header_length: str | None,
) -> Response:
    try:
        length = int(header_length) if header_length is not None else None
    except ValueError as exc:
        raise MalformedBodyError("Inference-Header-Content-Length must be an integer") from exc
    json_cap = container.settings.max_json_bytes
    declared = request.headers.get("content-length", "")
    if length is None and declared.isdigit() and int(declared) > json_cap:
        raise PayloadTooLargeError(_JSON_TOO_LARGE.format(json_cap))
    body = (await read_payload(request, container, principal)).body
    if length is None and len(body) > json_cap:
        # Tensors as JSON cost dozens of bytes of Python objects per number; large ones go binary.
        raise PayloadTooLargeError(_JSON_TOO_LARGE.format(json_cap))
    if len(body) <= INLINE_PARSE_BYTES:
        decoded = decode_request(body, length, container.settings.max_tensor_bytes)
    else:
        decoded = await asyncio.to_thread(decode_request, body, length, container.settings.max_tensor_bytes)
    timeout_s = deadline_from_parameters(decoded.request.parameters)
    deadline = request_deadline(request, container.settings, timeout_s)
    context = request_context(request, principal, hashlib.sha256(body).hexdigest())
    result = await container.pipeline.infer_tensors(name, version, decoded.tensors, deadline, context)
    payload, json_length = encode_response(
        result.served.spec.name,
        result.served.version,
        decoded.request.id,
        result.outputs,
        decoded,
        parameters=provenance(result.served),
    )
    media = "application/json" if json_length is None else "application/octet-stream"
    headers = {} if json_length is None else {"Inference-Header-Content-Length": str(json_length)}
    if wants_sealed(request):
        return sealed_response(principal, payload, media, headers)
    return Response(payload, media_type=media, headers=headers)


@router.post(
    "/models/{name}/infer",
    operation_id="v2ModelInfer",
    tags=[TAG],
    summary="Run inference",
    openapi_extra=_INFER_OPENAPI,
    responses=_INFER_RESPONSES,
    response_class=Response,
)
async def model_infer(
    name: ModelName,
    request: Request,
    container: ContainerDep,
    principal: Inferrer,
    inference_header_content_length: Annotated[str | None, Header(include_in_schema=False, alias=HEADER_LENGTH)] = None,
) -> Response:
    return await _infer(request, container, principal, name, None, inference_header_content_length)


@router.post(
    "/models/{name}/versions/{version}/infer",
    operation_id="v2ModelVersionInfer",
    tags=[TAG],
    summary="Run inference on one version",
    openapi_extra=_INFER_OPENAPI,
    responses=_INFER_RESPONSES,
    response_class=Response,
)
async def model_version_infer(
    name: ModelName,
    version: Version,
    request: Request,
    container: ContainerDep,
    principal: Inferrer,
    inference_header_content_length: Annotated[str | None, Header(include_in_schema=False, alias=HEADER_LENGTH)] = None,
) -> Response:
    return await _infer(request, container, principal, name, version, inference_header_content_length)
