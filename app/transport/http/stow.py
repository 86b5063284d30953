"""STOW-RS results: the transport's one table of failure reasons, and the response it answers with.

PS3.18 §10.5.3 gives the HTTP status of a Store Transaction and Annex I the Store Instances
Response Module it carries, here in the DICOM JSON encoding of PS3.18 Annex F
(``application/dicom+json``). Routes record each instance as stored or failed, with the domain
error that failed it, and never pick a Failure Reason themselves: :func:`failure_reason` does,
through :data:`FAILURE_REASON_BY_ERROR`.

Choices where the standard leaves room (our conformance statement must list them):

* Study Instance UID mismatch has no code of its own in PS3.18 Table I.2-2. We answer 0xC409,
  as dcm4chee-arc does, in the "Error: Cannot understand" range; Microsoft's DICOM service uses
  0xA900/0xA901 instead. Either is allowed ("Additional codes may be used", §I.2.2).
* An instance (or a body) over the size caps gets 0xA700, "Refused: out of resources": the caps
  are the server's resource limits. It shares the code with transient shortages, so a client
  cannot tell from the code alone whether a retry can succeed.
* A part that is not readable DICOM has no SOP Class or Instance UID to report. The SOP Instance
  Reference Macro (PS3.3 Table 10-11) makes both Type 1, which such an item cannot honour; we
  send them present and empty (Type 2 style) rather than invent UIDs or drop the attributes, so
  every Failed SOP Sequence item has the same shape and still carries its Failure Reason.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from app import errors as e

DICOM_JSON: Final = "application/dicom+json"

# Attribute tags of the Store Instances Response Module (PS3.18 Table I.1-1), as DICOM JSON keys.
RETRIEVE_URL: Final = "00081190"  # Retrieve URL, UR
WARNING_REASON: Final = "00081196"  # Warning Reason, US
FAILURE_REASON_TAG: Final = "00081197"  # Failure Reason, US
FAILED_SOP_SEQUENCE: Final = "00081198"  # Failed SOP Sequence, SQ
REFERENCED_SOP_SEQUENCE: Final = "00081199"  # Referenced SOP Sequence, SQ
REFERENCED_SOP_CLASS_UID: Final = "00081150"  # Referenced SOP Class UID, UI
REFERENCED_SOP_INSTANCE_UID: Final = "00081155"  # Referenced SOP Instance UID, UI


class FailureReason(enum.IntEnum):
    """Failure Reason (0008,1197) values, PS3.18 §I.2.2 Table I.2-2 (and PS3.4 Table B.2-1)."""

    PROCESSING_FAILURE = 0x0110
    """A general failure in processing the operation."""
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    """Referenced SOP Class not supported."""
    OUT_OF_RESOURCES = 0xA700
    """Refused: out of resources (A7xx)."""
    CANNOT_UNDERSTAND = 0xC000
    """Error: cannot understand certain Data Elements (Cxxx)."""
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    """Referenced Transfer Syntax not supported."""
    STUDY_MISMATCH = 0xC409
    """Implementation-specific, in the Cxxx range: the instance's Study Instance UID is not the
    one in the request's path (dcm4chee-arc's code for the same condition)."""


class WarningReason(enum.IntEnum):
    """Warning Reason (0008,1196) values, PS3.18 §I.2.1 Table I.2-1."""

    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007


#: The STOW-RS transport's one table: domain error -> Failure Reason. Subclasses inherit their
#: base's entry; anything not listed is a processing failure (0x0110).
FAILURE_REASON_BY_ERROR: Final[Mapping[type[e.MedinferError], int]] = {
    # Not readable DICOM (not Part 10, truncated, malformed element, missing required attribute).
    e.DicomMalformedError: FailureReason.CANNOT_UNDERSTAND,
    # A part that is not application/dicom at all, or a multipart envelope that broke off after
    # some instances were stored (the route then reports the rest as one failed item).
    e.UnsupportedMediaTypeError: FailureReason.CANNOT_UNDERSTAND,
    e.MalformedBodyError: FailureReason.CANNOT_UNDERSTAND,
    # Mostly the transfer syntax; an unsupported bit depth or pixel layout is the same refusal
    # of an encoding, and PS3.18 has no closer code.
    e.DicomUnsupportedError: FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
    # Nothing served is intended for this kind of instance; 0x0122 is the standard's "we do not
    # take this kind of instance", even when the allow-list that refused it is Modality or
    # BodyPartExamined rather than the SOP Class.
    e.DicomNotAcceptedError: FailureReason.SOP_CLASS_NOT_SUPPORTED,
    e.NoRouteError: FailureReason.SOP_CLASS_NOT_SUPPORTED,
    # The routed model is not for clinical use and not acknowledged in production: the service
    # does not take this kind of instance here either.
    e.ModelNotAcknowledgedError: FailureReason.SOP_CLASS_NOT_SUPPORTED,
    e.StudyMismatchError: FailureReason.STUDY_MISMATCH,
    e.DicomTooLargeError: FailureReason.OUT_OF_RESOURCES,
    e.PayloadTooLargeError: FailureReason.OUT_OF_RESOURCES,
    # The service could not take the instance now; a later retry may succeed.
    e.OutOfResourcesError: FailureReason.OUT_OF_RESOURCES,
    e.OverloadedError: FailureReason.OUT_OF_RESOURCES,
    e.DeadlineExceededError: FailureReason.OUT_OF_RESOURCES,
    e.ModelNotReadyError: FailureReason.OUT_OF_RESOURCES,
    e.AuditUnavailableError: FailureReason.OUT_OF_RESOURCES,
    e.DatabaseUnavailableError: FailureReason.OUT_OF_RESOURCES,
}


def failure_reason(error: BaseException) -> int:
    """The Failure Reason (0008,1197) for the error that kept an instance from being stored."""
    for cls in type(error).__mro__:
        if issubclass(cls, e.MedinferError) and cls in FAILURE_REASON_BY_ERROR:
            return FAILURE_REASON_BY_ERROR[cls]
    return FailureReason.PROCESSING_FAILURE


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """An instance the transaction stored: an item of the Referenced SOP Sequence."""

    sop_class_uid: str
    sop_instance_uid: str
    retrieve_url: str | None
    warning_reason: int | None = None
    """A Warning Reason (PS3.18 §I.2.1) when the instance was stored with a warning."""


@dataclass(frozen=True, slots=True)
class FailedInstance:
    """An instance the transaction did not store: an item of the Failed SOP Sequence.

    The UIDs are ``None`` when the part could not be read far enough to find them.
    """

    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: int


def stow_response(
    stored: Sequence[StoredInstance],
    failed: Sequence[FailedInstance],
    *,
    study_retrieve_url: str | None,
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the Store Instances Response Module (PS3.18 Annex I) in DICOM JSON.

    Status (PS3.18 §10.5.3.1 Table 10.5.3-1): 200 when every instance was stored without a
    warning; 202 when some were stored but others failed or carry a warning; 409 when none was
    stored (the table's "unable to store any Instances ... for a mixture of reasons").

    Retrieve URL (0008,1190) is Type 2, so it is always present, empty when the study has no URL.
    The Failed and Referenced SOP Sequences are Type 1C, present only when they have items.
    """
    dataset: dict[str, Any] = {RETRIEVE_URL: _element("UR", study_retrieve_url)}
    if failed:
        dataset[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_failed_item(item) for item in failed]}
    if stored:
        dataset[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_stored_item(item) for item in stored]}
    if not stored:
        status = 409
    elif failed or any(item.warning_reason is not None for item in stored):
        status = 202
    else:
        status = 200
    return status, dict(sorted(dataset.items()))


def _element(vr: str, value: str | int | None) -> dict[str, Any]:
    """A DICOM JSON attribute (PS3.18 §F.2.2): an empty value has no ``Value`` member at all."""
    if value is None or value == "":
        return {"vr": vr}
    return {"vr": vr, "Value": [int(value) if isinstance(value, int) else value]}


def _failed_item(item: FailedInstance) -> dict[str, Any]:
    return {
        REFERENCED_SOP_CLASS_UID: _element("UI", item.sop_class_uid),
        REFERENCED_SOP_INSTANCE_UID: _element("UI", item.sop_instance_uid),
        FAILURE_REASON_TAG: _element("US", item.reason),
    }


def _stored_item(item: StoredInstance) -> dict[str, Any]:
    element = {
        REFERENCED_SOP_CLASS_UID: _element("UI", item.sop_class_uid),
        REFERENCED_SOP_INSTANCE_UID: _element("UI", item.sop_instance_uid),
        RETRIEVE_URL: _element("UR", item.retrieve_url),
    }
    if item.warning_reason is not None:
        element[WARNING_REASON] = _element("US", item.warning_reason)
    return dict(sorted(element.items()))
