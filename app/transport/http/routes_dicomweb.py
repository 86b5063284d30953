"""DICOMweb STOW-RS (PS3.18 §10.5): PACS and modalities store studies; medinfer infers them.

The body is parsed as it streams in (chunked bodies without Content-Length included), one part
at a time under the per-instance and per-request caps. Each instance goes through the same door
as C-STORE (:meth:`ImagingService.accept`): checked, routed and sealed to the spool before it
is reported stored. Inference runs asynchronously once the study settles, and its DICOM SR goes
to the configured PACS destination. The answer is the Store Instances Response Module as
``application/dicom+json``: 200 all stored, 202 some failed, 409 none stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Final

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from app.errors import MedinferError, NotAcceptableError, UnsupportedMediaTypeError
from app.parsing.dicom import file_meta_uids
from app.transport.http.deps import ContainerDep, ImagingDep, Inferrer, media_type_of, record_action
from app.transport.http.multipart import iter_parts, parse_related
from app.transport.http.problems import COMMON_ERRORS, problem_responses
from app.transport.http.stow import DICOM_JSON, FailedInstance, StoredInstance, failure_reason, stow_response

router = APIRouter(prefix="/dicomweb")
TAG: Final = "dicomweb"
DICOM: Final = "application/dicom"
UID_PATTERN: Final = r"^[0-9]+(\.[0-9]+)*$"
_ACCEPTS: Final = frozenset({"", "*/*", "application/*", DICOM_JSON, "application/json"})

_FAILED_ITEM: Final = {
    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.4"]},
    "00081155": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.2"]},
    "00081197": {"vr": "US", "Value": [290]},
}
STOW_EXAMPLE: Final = {
    "00081199": {
        "vr": "SQ",
        "Value": [
            {
                "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1"]},
                "00081155": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.1"]},
            }
        ],
    }
}

_OPENAPI: Final = {
    "requestBody": {
        "required": True,
        "description": 'DICOM Part 10 instances as multipart/related; type="application/dicom" (PS3.18 §8.6.1.2). '
        "Chunked transfer encoding is accepted.",
        "content": {
            "multipart/related": {
                "schema": {"type": "string", "format": "binary"},
                "example": "--b1\r\nContent-Type: application/dicom\r\n\r\n<DICOM Part 10 bytes>\r\n--b1--\r\n",
            }
        },
    }
}
_RESPONSES: Final = {
    200: {
        "description": "All instances stored; inference follows asynchronously.",
        "content": {DICOM_JSON: {"schema": {"type": "object"}, "example": STOW_EXAMPLE}},
    },
    202: {
        "description": "Some instances stored, some failed (FailedSOPSequence with FailureReason).",
        "content": {
            DICOM_JSON: {
                "schema": {"type": "object"},
                "example": {**STOW_EXAMPLE, "00081198": {"vr": "SQ", "Value": [_FAILED_ITEM]}},
            }
        },
    },
    409: {
        "description": "No instance could be stored (FailedSOPSequence with FailureReason).",
        "content": {
            DICOM_JSON: {"schema": {"type": "object"}, "example": {"00081198": {"vr": "SQ", "Value": [_FAILED_ITEM]}}}
        },
    },
    **problem_responses(400, 401, 403, 406, 413, 415, 503, *COMMON_ERRORS),
}
_DESCRIPTION: Final = (
    "Stores DICOM instances for inference. Each is checked strictly (size caps before pixel decoding, "
    "the routed model's allow-lists), sealed to the spool, and inferred once its study settles; the "
    "result goes back to the PACS as DICOM SR. Scope `infer`."
)


def _uids(encoded: bytes) -> tuple[str | None, str | None]:
    """The SOP Class and Instance UIDs of a refused instance, where its File Meta Information can
    be read cheaply (a refused instance may be a bomb: it is not parsed again in full)."""
    return file_meta_uids(encoded)


async def _store(
    request: Request, container: ContainerDep, imaging: ImagingDep, principal: Inferrer, study: str | None
) -> Response:
    if media_type_of(request.headers.get("accept")) not in _ACCEPTS:
        raise NotAcceptableError("STOW-RS answers application/dicom+json")
    related = parse_related(request.headers.get("content-type", ""))
    if related.type not in {"", DICOM}:
        raise UnsupportedMediaTypeError('STOW-RS takes multipart/related; type="application/dicom"')
    settings = container.settings
    stored: list[StoredInstance] = []
    failed: list[FailedInstance] = []
    parts = iter_parts(
        request.stream(),
        related.boundary,
        max_part_bytes=settings.dicom_max_instance_bytes,
        max_total_bytes=settings.max_body_bytes,
        max_parts=settings.dicom_max_parts,
    )
    try:
        async for part in parts:
            if part.content_type not in {"", DICOM}:
                failed.append(FailedInstance(None, None, failure_reason(UnsupportedMediaTypeError("part"))))
                continue
            try:
                accepted = await asyncio.to_thread(
                    imaging.accept, part.body, transport="stow", actor=principal.client_id, expected_study=study
                )
            except MedinferError as exc:
                sop_class, sop_instance = await asyncio.to_thread(_uids, part.body)
                failed.append(FailedInstance(sop_class, sop_instance, failure_reason(exc)))
                continue
            stored.append(StoredInstance(accepted.sop_class_uid, accepted.sop_instance_uid, None))
    except MedinferError as exc:
        # The envelope broke: what was stored stays stored, and is reported; otherwise a problem.
        if not stored:
            raise
        failed.append(FailedInstance(None, None, failure_reason(exc)))
    status, body = stow_response(stored, failed, study_retrieve_url=None)
    with contextlib.suppress(MedinferError):
        await record_action(
            request,
            container,
            principal,
            "dicom.store",
            "success" if not failed else ("failure" if not stored else "partial"),
            stored=len(stored),
            failed=len(failed),
        )
    return Response(json.dumps(body).encode(), status_code=status, media_type=DICOM_JSON)


@router.post(
    "/studies",
    operation_id="storeInstances",
    tags=[TAG],
    summary="Store instances (STOW-RS)",
    description=_DESCRIPTION,
    openapi_extra=_OPENAPI,
    responses=_RESPONSES,
    response_class=Response,
)
async def store_instances(
    request: Request, container: ContainerDep, imaging: ImagingDep, principal: Inferrer
) -> Response:
    return await _store(request, container, imaging, principal, None)


@router.post(
    "/studies/{study}",
    operation_id="storeStudyInstances",
    tags=[TAG],
    summary="Store instances of one study (STOW-RS)",
    description=_DESCRIPTION + " Instances of another study fail with FailureReason and are not stored.",
    openapi_extra=_OPENAPI,
    responses=_RESPONSES,
    response_class=Response,
)
async def store_study_instances(
    request: Request,
    container: ContainerDep,
    imaging: ImagingDep,
    principal: Inferrer,
    study: Annotated[str, Path(max_length=64, pattern=UID_PATTERN, examples=["1.2.826.0.1.3680043.8.498.7"])],
) -> Response:
    return await _store(request, container, imaging, principal, study)
