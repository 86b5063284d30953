"""The one domain error hierarchy.

Errors know nothing of HTTP or DIMSE. Each carries a stable ``code`` (the last segment of its
problem ``type``) and a :class:`ErrorKind` that every transport maps through one table:
``transport/http/problems.py`` to an HTTP status, later the DIMSE and STOW-RS tables likewise.
The ``detail`` is shown to the caller, so it must never contain PHI: name the attribute or the
input, never its value.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorKind(enum.Enum):
    """What went wrong, from the caller's side. Transports map a kind to their own status."""

    INVALID_INPUT = "invalid_input"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    NOT_ACCEPTABLE = "not_acceptable"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class MedinferError(Exception):
    """Base of every error the service raises on purpose.

    Raised: never directly; raise a subclass.
    Recovery: transports catch it and answer with the mapped status and ``code``.
    """

    code: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"
    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL

    def __init__(self, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class InvalidRequestError(MedinferError):
    """The request is syntactically valid HTTP but its content breaks the operation's schema.

    Recovery: fix the named field and resend.
    """

    code = "invalid-request"
    title = "Invalid request"
    kind = ErrorKind.INVALID_INPUT


class MissingFeaturesError(MedinferError):
    """The record lacks features the model needs (or, under the ``reject`` policy, any feature).
    The detail lists them by LOINC code (or site code / Patient field).

    Recovery: send the listed Observations, or use a model whose policy imputes them.
    """

    code = "missing-features"
    title = "Missing features"
    kind = ErrorKind.INVALID_INPUT


class MalformedBodyError(MedinferError):
    """The body could not be parsed at all (for example JSON that does not decode).

    Recovery: send a well-formed body of the declared content type.
    """

    code = "malformed-body"
    title = "Malformed request body"
    kind = ErrorKind.INVALID_INPUT


class PayloadTooLargeError(MedinferError):
    """The body exceeds ``MEDINFER_MAX_BODY_BYTES``; raised before the body is read in full.

    Recovery: send a smaller payload, or raise the limit on the server.
    """

    code = "payload-too-large"
    title = "Payload too large"
    kind = ErrorKind.TOO_LARGE


class UnsupportedMediaTypeError(MedinferError):
    """The ``Content-Type`` is not one the operation accepts.

    Recovery: send one of the media types listed in the OpenAPI document.
    """

    code = "unsupported-media-type"
    title = "Unsupported media type"
    kind = ErrorKind.UNSUPPORTED_MEDIA_TYPE


class NotAcceptableError(MedinferError):
    """The ``Accept`` header asks for a representation the operation cannot produce.

    Recovery: accept one of the media types listed in the OpenAPI document.
    """

    code = "not-acceptable"
    title = "Not acceptable"
    kind = ErrorKind.NOT_ACCEPTABLE


class RouteNotFoundError(MedinferError):
    """No operation exists at this path.

    Recovery: check the path against the OpenAPI document.
    """

    code = "not-found"
    title = "Not found"
    kind = ErrorKind.NOT_FOUND


class MethodNotAllowedError(MedinferError):
    """The path exists but not with this HTTP method.

    Recovery: use one of the methods in the ``Allow`` header.
    """

    code = "method-not-allowed"
    title = "Method not allowed"
    kind = ErrorKind.CONFLICT


class AuthenticationError(MedinferError):
    """No credentials, or credentials that do not identify a registered client.

    Recovery: send ``Authorization: Bearer <api key>`` with a valid, unrevoked key.
    """

    code = "unauthenticated"
    title = "Authentication required"
    kind = ErrorKind.UNAUTHENTICATED


class PermissionDeniedError(MedinferError):
    """The authenticated client lacks the scope the operation needs.

    Recovery: ask an administrator to grant the scope named in the detail.
    """

    code = "forbidden"
    title = "Permission denied"
    kind = ErrorKind.FORBIDDEN


class ModelNotFoundError(MedinferError):
    """No model, or no such version of it, is in the repository.

    Recovery: list models with ``GET /v1/models``.
    """

    code = "model-not-found"
    title = "Model not found"
    kind = ErrorKind.NOT_FOUND


class ResultNotFoundError(MedinferError):
    """No inference result carries the request id the feedback names (or it belongs to another
    model). Raised when an outcome is recorded.

    Recovery: send the ``request_id`` of the prediction answer (or its ``X-Request-ID``).
    """

    code = "result-not-found"
    title = "Result not found"
    kind = ErrorKind.NOT_FOUND


class FeedbackConflictError(MedinferError):
    """The result already has a confirmed outcome, or it cannot be judged (it failed, or it was
    indeterminate). Nothing is stored twice.

    Recovery: none needed for a duplicate; an outcome is recorded once per result.
    """

    code = "feedback-conflict"
    title = "Outcome already recorded or not applicable"
    kind = ErrorKind.CONFLICT


class ModelSpecError(MedinferError):
    """A ``model.toml`` fails validation. Raised while loading the repository.

    Recovery: fix the file; ``medinfer models validate`` names the field.
    """

    code = "model-spec-invalid"
    title = "Invalid model specification"
    kind = ErrorKind.INVALID_INPUT


class ModelIntegrityError(MedinferError):
    """A model file's sha256 differs from the one pinned in ``model.toml``.

    The version is refused before ONNX Runtime ever sees the file; other versions keep serving.
    Recovery: restore the file, or pin the new checksum after review.
    """

    code = "model-integrity"
    title = "Model integrity check failed"
    kind = ErrorKind.CONFLICT


class ModelSignatureError(MedinferError):
    """A trusted signing key is configured and a version's ``model.onnx.sig`` is missing or does
    not verify. The file is refused before ONNX Runtime sees it.

    Recovery: sign the file with ``medinfer models sign`` using the release key.
    """

    code = "model-signature"
    title = "Model signature check failed"
    kind = ErrorKind.CONFLICT


class ModelNotAcknowledgedError(MedinferError):
    """In production, a version whose model card says "not for clinical use" is not served unless
    the operator names it in ``MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS``. Other versions keep
    serving; ``/readyz`` details and ``medinfer_model_versions_refused_total`` show the refusal.

    Recovery: serve a model released for clinical use, or acknowledge this one (name@version) for a
    non-clinical deployment; its results still never reach a PACS or HIS as a coded finding.
    """

    code = "model-not-acknowledged"
    title = "Demonstration model not acknowledged"
    kind = ErrorKind.CONFLICT


class ModelLoadError(MedinferError):
    """ONNX Runtime refused the file, or its warm-up run failed.

    Recovery: the previous version (if any) keeps serving; see the logs for the request id.
    """

    code = "model-load-failed"
    title = "Model failed to load"
    kind = ErrorKind.CONFLICT


class ModelNotReadyError(MedinferError):
    """The model exists but no version of it is serving right now.

    Recovery: retry after ``Retry-After`` seconds; check ``/readyz`` details.
    """

    code = "model-not-ready"
    title = "Model not ready"
    kind = ErrorKind.UNAVAILABLE


class DatabaseUnavailableError(MedinferError):
    """The database did not answer in time. The service fails closed rather than lose records.

    Recovery: retry later; operators check the database.
    """

    code = "database-unavailable"
    title = "Database unavailable"
    kind = ErrorKind.UNAVAILABLE


class InvalidTensorError(MedinferError):
    """An input tensor does not fit the model: unknown name, wrong datatype or shape, element
    count that disagrees with the shape, or NaN/Inf where the model forbids them.

    Recovery: send the tensor as the model metadata (``GET /v2/models/{name}``) describes it.
    """

    code = "invalid-tensor"
    title = "Invalid input tensor"
    kind = ErrorKind.INVALID_INPUT


class OverloadedError(MedinferError):
    """The model's queue is full. Nothing was run.

    Recovery: retry after the ``Retry-After`` seconds, or spread load across replicas.
    """

    code = "overloaded"
    title = "Too many requests"
    kind = ErrorKind.OVERLOADED


class DeadlineExceededError(MedinferError):
    """The request's deadline passed while it waited in the queue, so it was not run.

    Recovery: retry with a longer deadline, or when the service is less loaded.
    """

    code = "deadline-exceeded"
    title = "Deadline exceeded"
    kind = ErrorKind.DEADLINE_EXCEEDED


class InferenceFailedError(MedinferError):
    """ONNX Runtime raised while running a batch. Every request of that batch gets this error.

    Recovery: report the request id to operators; the model may need to be withdrawn.
    """

    code = "inference-failed"
    title = "Inference failed"
    kind = ErrorKind.INTERNAL


class DecryptionError(MedinferError):
    """A JWE body could not be opened: malformed, a disallowed ``alg``/``enc``, ``zip``, a
    ``crit`` extension, an unknown or retired ``kid``, or a tag that does not verify. The detail
    is the same for all of them on purpose; ``reason`` feeds the metrics only.

    Recovery: encrypt to a key from ``/.well-known/jwks.json`` with ECDH-ES+A256KW or
    RSA-OAEP-256 and A256GCM, without compression.
    """

    code = "decryption-failed"
    title = "Payload could not be decrypted"
    kind = ErrorKind.INVALID_INPUT

    def __init__(self, detail: str, *, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason


class EncryptionRequiredError(MedinferError):
    """This deployment accepts only JWE-encrypted payloads (``MEDINFER_REQUIRE_ENCRYPTION``).

    Recovery: send the body as ``application/jose`` encrypted to the service's JWKS.
    """

    code = "encryption-required"
    title = "Encryption required"
    kind = ErrorKind.UNSUPPORTED_MEDIA_TYPE


class AuditUnavailableError(MedinferError):
    """The audit event could not be committed, so the result is withheld (fail closed).

    Recovery: retry after ``Retry-After``; operators check the database.
    """

    code = "audit-unavailable"
    title = "Audit trail unavailable"
    kind = ErrorKind.UNAVAILABLE


class TracingUnavailableError(MedinferError):
    """``MEDINFER_OTEL_ENABLED`` is on but the ``otel`` extra is not installed. Raised at start-up.

    Recovery: ``pip install medinfer[otel]``, or switch tracing off.
    """

    code = "tracing-unavailable"
    title = "Tracing unavailable"


class DicomMalformedError(MedinferError):
    """The bytes are not a readable DICOM Part 10 instance: not DICOM at all, truncated, a
    malformed element or sequence, or missing a required attribute (named in the detail).

    Recovery: send a complete, well-formed instance (preamble, ``DICM``, File Meta Information).
    """

    code = "dicom-malformed"
    title = "Malformed DICOM"
    kind = ErrorKind.INVALID_INPUT


class DicomUnsupportedError(MedinferError):
    """The instance is well formed but cannot be decoded here: an unsupported transfer syntax,
    bit depth or pixel layout. The detail names the transfer syntax or attribute.

    Recovery: send it in a supported transfer syntax (see ``docs/imaging.md``).
    """

    code = "dicom-unsupported"
    title = "Unsupported DICOM encoding"
    kind = ErrorKind.UNSUPPORTED_MEDIA_TYPE


class DicomNotAcceptedError(MedinferError):
    """The instance does not fit the model's allow-lists in ``model.toml`` (SOP Class, Modality,
    BodyPartExamined, ViewPosition, PhotometricInterpretation, frames). The detail names the
    attribute and the accepted values, never the patient's data.

    Recovery: send a study the model is intended for, or route it to another model.
    """

    code = "dicom-not-accepted"
    title = "DICOM instance not accepted by the model"
    kind = ErrorKind.INVALID_INPUT


class DicomTooLargeError(MedinferError):
    """The instance's bytes, or the pixel buffer its header declares (Rows x Columns x Frames x
    BitsAllocated x SamplesPerPixel), exceed the caps. Checked before any pixel is decoded.

    Recovery: send a smaller image, or raise ``MEDINFER_DICOM_MAX_PIXEL_BYTES``.
    """

    code = "dicom-too-large"
    title = "DICOM instance too large"
    kind = ErrorKind.TOO_LARGE


class StudyMismatchError(MedinferError):
    """An instance belongs to another study or patient than the request names: a STOW-RS to
    ``/studies/{study}`` with a different StudyInstanceUID, or a series that mixes studies.

    Recovery: send each study's instances separately, to its own StudyInstanceUID.
    """

    code = "study-mismatch"
    title = "Study mismatch"
    kind = ErrorKind.CONFLICT


class NoRouteError(MedinferError):
    """No imaging routing rule of the site (``MEDINFER_IMAGING_ROUTES``) enables a model for this
    instance's Modality and BodyPartExamined, so it is not accepted. A model's own allow-lists
    never route by themselves: the site decides which models see its studies.

    Recovery: add a routing rule, or send only images a routed model is intended for.
    """

    code = "no-route"
    title = "No model for this image"
    kind = ErrorKind.INVALID_INPUT


class OutOfResourcesError(MedinferError):
    """The service cannot take the instance now: the DICOM spool's disk is full or unwritable,
    or the ingest queue is at its cap. Nothing was accepted.

    Recovery: retry later; operators free spool space (``MEDINFER_DICOM_SPOOL_DIR``).
    """

    code = "out-of-resources"
    title = "Out of resources"
    kind = ErrorKind.UNAVAILABLE


class DeliveryError(MedinferError):
    """A result could not be delivered to the PACS destination (association refused, a failure
    status, a timeout). The outbox keeps it and retries with backoff.

    Recovery: none needed by the caller; operators check the destination.
    """

    code = "delivery-failed"
    title = "Delivery to PACS failed"
    kind = ErrorKind.UNAVAILABLE


class RequestTimeoutError(MedinferError):
    """The request's headers or body did not arrive in time (a slow or stalled sender).

    Recovery: resend; check the network path between the client and the service.
    """

    code = "request-timeout"
    title = "Request timeout"
    kind = ErrorKind.INVALID_INPUT


class ClientExistsError(MedinferError):
    """A client with this ``client_id`` is already registered; ids are unique, so one id always
    names one caller in the audit trail.

    Recovery: choose another id, or revoke the existing client first.
    """

    code = "client-exists"
    title = "Client already registered"
    kind = ErrorKind.CONFLICT


class ClientNotFoundError(MedinferError):
    """No registered client has this ``client_id``.

    Recovery: list the clients and use an id from the list.
    """

    code = "client-not-found"
    title = "Client not found"
    kind = ErrorKind.NOT_FOUND


ALL_ERRORS: tuple[type[MedinferError], ...] = (
    MedinferError,
    InvalidRequestError,
    MissingFeaturesError,
    MalformedBodyError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    NotAcceptableError,
    RouteNotFoundError,
    MethodNotAllowedError,
    AuthenticationError,
    PermissionDeniedError,
    ModelNotFoundError,
    ResultNotFoundError,
    FeedbackConflictError,
    ModelSpecError,
    ModelIntegrityError,
    ModelSignatureError,
    ModelNotAcknowledgedError,
    ModelLoadError,
    ModelNotReadyError,
    DatabaseUnavailableError,
    InvalidTensorError,
    OverloadedError,
    DeadlineExceededError,
    InferenceFailedError,
    AuditUnavailableError,
    DecryptionError,
    EncryptionRequiredError,
    TracingUnavailableError,
    DicomMalformedError,
    DicomUnsupportedError,
    DicomNotAcceptedError,
    DicomTooLargeError,
    StudyMismatchError,
    NoRouteError,
    OutOfResourcesError,
    DeliveryError,
    RequestTimeoutError,
    ClientExistsError,
    ClientNotFoundError,
)
