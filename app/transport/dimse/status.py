"""Domain errors -> C-STORE response Status: the DIMSE transport's one table.

The handler in :mod:`app.transport.dimse.scp` never picks a status itself: it catches
:class:`~app.errors.MedinferError` and asks :func:`cstore_status`. Every value is a *Failure*
of the Storage Service Class (PS3.4 Annex B.2.3, PS3.7 Annex C), because an instance that was
not spooled must never be acknowledged; the sender keeps it and decides whether to retry.

The three failure families tell a sending modality or PACS router what to do next:

* ``0xA7xx`` *Refused: Out of Resources*: transient, retry later. The low byte tells operators
  which resource ran out, since many SCUs log the status but not the Error Comment.
* ``0xA9xx`` *Data Set does not match SOP Class*: the data set contradicts its own SOP Class.
  None of our errors means that today (a missing attribute is :class:`DicomMalformedError`), so
  the range is unused rather than stretched over errors that mean something else.
* ``0xCxxx`` *Cannot understand*: permanent for this instance; resending it will fail again.
  ``0xC210`` and ``0xC211`` follow pynetdicom's own use (data set could not be decoded; the
  handler raised); the other ``0xC2xx`` values are ours, one per error type, so a sender's log
  alone says why an instance was refused.

The Error Comment (0000,0902) carries the error's stable ``code``, never its ``detail`` and
never the message of an unexpected exception, so nothing from the data set leaves in a status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from app import errors as e

SUCCESS: Final = 0x0000

#: Refused: Out of Resources (PS3.4 B.2.3), transient.
OUT_OF_RESOURCES: Final = 0xA700
OVERLOADED: Final = 0xA701
DEPENDENCY_UNAVAILABLE: Final = 0xA702
DEADLINE_EXCEEDED: Final = 0xA703

#: Cannot understand (PS3.4 B.2.3), permanent for this instance.
CANNOT_UNDERSTAND: Final = 0xC000
MALFORMED: Final = 0xC210
UNEXPECTED: Final = 0xC211
UNSUPPORTED_ENCODING: Final = 0xC212
TOO_LARGE: Final = 0xC213
NOT_ACCEPTED: Final = 0xC214
NO_ROUTE: Final = 0xC215
STUDY_MISMATCH: Final = 0xC216
MODEL_NOT_ACKNOWLEDGED: Final = 0xC217

#: Refused: Not Authorised, a general status (PS3.7 Annex C) pynetdicom lists for C-STORE.
NOT_AUTHORISED: Final = 0x0124

#: Errors a C-STORE handler can meet, each with the status that says why to the sender.
STATUS_BY_ERROR: Final[Mapping[type[e.MedinferError], int]] = {
    # Spool disk full or ingest queue at its cap: nothing was taken, try again later.
    e.OutOfResourcesError: OUT_OF_RESOURCES,
    # The models' queues are full; same advice, different operator action.
    e.OverloadedError: OVERLOADED,
    # The instance could be spooled but its audit row or database write could not: fail closed.
    e.AuditUnavailableError: DEPENDENCY_UNAVAILABLE,
    e.DatabaseUnavailableError: DEPENDENCY_UNAVAILABLE,
    e.ModelNotReadyError: DEPENDENCY_UNAVAILABLE,
    # Not readable as DICOM: the data set could not be decoded (pynetdicom's 0xC210).
    e.DicomMalformedError: MALFORMED,
    # Well formed, but its transfer syntax or pixel layout cannot be decoded here.
    e.DicomUnsupportedError: UNSUPPORTED_ENCODING,
    # Over the size caps. Permanent, not 0xA7xx: retrying the same instance cannot succeed.
    e.DicomTooLargeError: TOO_LARGE,
    # A valid instance that the served models are not intended for (their allow-lists).
    e.DicomNotAcceptedError: NOT_ACCEPTED,
    # No routing rule (MEDINFER_IMAGING_ROUTES) enables a model for this Modality and BodyPartExamined.
    e.NoRouteError: NO_ROUTE,
    # The route names a not-for-clinical-use model that production does not serve unacknowledged.
    # Permanent until an operator changes the settings: resending cannot succeed.
    e.ModelNotAcknowledgedError: MODEL_NOT_ACKNOWLEDGED,
    # The instance disagrees with the study already received on this association.
    e.StudyMismatchError: STUDY_MISMATCH,
}

#: Fallback for errors not named above, by what went wrong from the sender's side.
STATUS_BY_KIND: Final[Mapping[e.ErrorKind, int]] = {
    e.ErrorKind.INVALID_INPUT: CANNOT_UNDERSTAND,
    e.ErrorKind.UNAUTHENTICATED: NOT_AUTHORISED,
    e.ErrorKind.FORBIDDEN: NOT_AUTHORISED,
    e.ErrorKind.NOT_FOUND: CANNOT_UNDERSTAND,
    e.ErrorKind.CONFLICT: CANNOT_UNDERSTAND,
    e.ErrorKind.TOO_LARGE: TOO_LARGE,
    e.ErrorKind.UNSUPPORTED_MEDIA_TYPE: UNSUPPORTED_ENCODING,
    e.ErrorKind.NOT_ACCEPTABLE: CANNOT_UNDERSTAND,
    e.ErrorKind.OVERLOADED: OVERLOADED,
    e.ErrorKind.UNAVAILABLE: DEPENDENCY_UNAVAILABLE,
    e.ErrorKind.DEADLINE_EXCEEDED: DEADLINE_EXCEEDED,
    e.ErrorKind.INTERNAL: UNEXPECTED,
}

#: The Error Comment (0000,0902) is LO: at most 64 characters.
ERROR_COMMENT_MAX: Final = 64
UNEXPECTED_COMMENT: Final = e.MedinferError.code


def cstore_status(error: BaseException) -> int:
    """The C-STORE failure status for ``error``; ``0xC211`` for anything not raised on purpose.

    A subclass of a listed error inherits its status; an unlisted one falls back to its kind.
    """
    if not isinstance(error, e.MedinferError):
        return UNEXPECTED
    for cls in type(error).__mro__:
        if issubclass(cls, e.MedinferError) and cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return STATUS_BY_KIND[error.kind]


def error_comment(error: BaseException) -> str:
    """The Error Comment for ``error``: its stable code, which names the error and nothing else."""
    code = error.code if isinstance(error, e.MedinferError) else UNEXPECTED_COMMENT
    return code[:ERROR_COMMENT_MAX]
