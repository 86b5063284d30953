"""Domain errors -> RFC 9457 ``application/problem+json``: the HTTP transport's one table.

Routes never catch errors to shape responses; they raise :mod:`app.errors` types and the
handlers installed by :func:`install_problem_handlers` answer. Framework errors (unknown route,
wrong method, request validation) are converted to the same domain errors first.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app import errors as e
from app.observability.logging import request_id_var

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
PROBLEM_BASE: Final = "/problems/"

#: The HTTP transport's mapping of error kinds. DIMSE and STOW-RS keep their own tables.
STATUS_BY_KIND: Final[Mapping[e.ErrorKind, int]] = {
    e.ErrorKind.INVALID_INPUT: 422,
    e.ErrorKind.UNAUTHENTICATED: 401,
    e.ErrorKind.FORBIDDEN: 403,
    e.ErrorKind.NOT_FOUND: 404,
    e.ErrorKind.CONFLICT: 409,
    e.ErrorKind.TOO_LARGE: 413,
    e.ErrorKind.UNSUPPORTED_MEDIA_TYPE: 415,
    e.ErrorKind.NOT_ACCEPTABLE: 406,
    e.ErrorKind.OVERLOADED: 429,
    e.ErrorKind.UNAVAILABLE: 503,
    e.ErrorKind.DEADLINE_EXCEEDED: 504,
    e.ErrorKind.INTERNAL: 500,
}

#: Where a kind's default status is not the right one for a specific error.
STATUS_OVERRIDES: Final[Mapping[type[e.MedinferError], int]] = {
    e.MalformedBodyError: 400,
    e.DecryptionError: 400,
    e.DicomMalformedError: 400,
    e.MethodNotAllowedError: 405,
    e.RequestTimeoutError: 408,
}

ERRORS_BY_CODE: Final[Mapping[str, type[e.MedinferError]]] = {cls.code: cls for cls in e.ALL_ERRORS}


def status_for(error: type[e.MedinferError]) -> int:
    return STATUS_OVERRIDES.get(error, STATUS_BY_KIND[error.kind])


def problem_body(error: e.MedinferError, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + error.code,
        "title": error.title,
        "status": status_for(type(error)),
        "detail": error.detail,
        "code": error.code,
    }
    if instance is not None:
        body["instance"] = instance
    request_id = request_id_var.get()
    if request_id is not None:
        body["request_id"] = request_id
    body.update(extra)
    return body


def problem_bytes(error: e.MedinferError) -> bytes:
    """For ASGI middleware that answers before the app runs."""
    return json.dumps(problem_body(error), separators=(",", ":")).encode()


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Never echo ``input``: it is caller data and may hold PHI.
    return [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in exc.errors()
    ]


V2_PREFIX: Final = "/v2"


def _status(request: Request, error: e.MedinferError) -> int:
    if error.kind is e.ErrorKind.OVERLOADED:
        overload: int = getattr(request.app.state, "overload_status", STATUS_BY_KIND[error.kind])
        return overload
    return status_for(type(error))


def _render(
    request: Request, error: e.MedinferError, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """problem+json everywhere, except the v2 family, which answers ``{"error": ...}``."""
    status = _status(request, error)
    out_headers = dict(headers or {})
    if error.retry_after_s is not None:
        out_headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    if isinstance(error, e.AuthenticationError):
        # RFC 6750 section 3: say which scheme to use; "invalid_token" when one was presented.
        presented = "authorization" in request.headers
        out_headers["WWW-Authenticate"] = 'Bearer realm="medinfer"' + (', error="invalid_token"' if presented else "")
    if request.url.path == V2_PREFIX or request.url.path.startswith(V2_PREFIX + "/"):
        return JSONResponse({"error": error.detail}, status_code=status, headers=out_headers)
    body = problem_body(error, request.url.path, **extra) | {"status": status}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=out_headers)


async def _on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.MedinferError)  # noqa: S101 - registered for this type only  # nosec B101
    if status_for(type(exc)) >= HTTPStatus.INTERNAL_SERVER_ERROR:
        log.error("request failed", extra={"event": "http.error", "code": exc.code})
    return _render(request, exc)


_FRAMEWORK_ERRORS: Final[Mapping[int, e.MedinferError]] = {
    HTTPStatus.NOT_FOUND: e.RouteNotFoundError("no operation at this path"),
    HTTPStatus.METHOD_NOT_ALLOWED: e.MethodNotAllowedError("method not allowed on this path"),
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: e.PayloadTooLargeError("request body exceeds the configured limit"),
}


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101 - registered for this type only  # nosec B101
    if isinstance(exc.__cause__, e.MedinferError):
        # FastAPI wraps errors raised while it reads the body (our size cap among them) in a 400.
        return _render(request, exc.__cause__)
    error = _FRAMEWORK_ERRORS.get(exc.status_code) or e.MalformedBodyError("request body could not be read")
    headers = dict(exc.headers or {})
    if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return _render(request, error, headers=headers)


_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method some route takes at this path (RFC 9110 15.5.6). Starlette names only the
    first matching route's, so a path served by two routes (``GET`` and ``POST
    /v1/admin/clients``) would advertise one. Probed per method, as routers may be nested."""
    allowed = []
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for this type only  # nosec B101
    details = _validation_errors(exc)
    if any(d["type"] == "json_invalid" for d in details):
        return _render(request, e.MalformedBodyError("request body is not valid JSON"))
    fields = ", ".join(".".join(d["loc"]) for d in details[:5])
    return _render(request, e.InvalidRequestError(f"request does not match the schema at: {fields}"), errors=details)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc, extra={"event": "http.unhandled"})
    return _render(request, e.MedinferError("unexpected server error; quote the request id"))


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.MedinferError, _on_domain_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)


def _example(error: type[e.MedinferError], detail: str) -> dict[str, Any]:
    return {
        "type": PROBLEM_BASE + error.code,
        "title": error.title,
        "status": status_for(error),
        "detail": detail,
        "code": error.code,
        "instance": "/v1/models/cxr-pneumonia",
        "request_id": "5f0c6d0e-8a0b-4a52-9a43-2f1d2b7b9c11",
    }


_EXAMPLES: Final[Mapping[int, tuple[type[e.MedinferError], str]]] = {
    400: (e.MalformedBodyError, "request body is not valid JSON"),
    401: (e.AuthenticationError, "missing Authorization header"),
    403: (e.PermissionDeniedError, "scope 'models:admin' required"),
    404: (e.ModelNotFoundError, "model 'cxr-pneumonia' is not in the repository"),
    405: (e.MethodNotAllowedError, "method not allowed on this path"),
    406: (e.NotAcceptableError, "answers are application/json or application/fhir+json"),
    409: (e.ModelIntegrityError, "cxr-pneumonia v2: sha256 3f2a... does not match the pinned 9b1c...; version refused"),
    413: (e.PayloadTooLargeError, "request body exceeds the configured limit"),
    415: (e.UnsupportedMediaTypeError, "expected application/json"),
    422: (e.InvalidRequestError, "request does not match the schema at: body.client_id"),
    429: (e.OverloadedError, "queue for cxr-pneumonia v1 is full"),
    504: (e.DeadlineExceededError, "deadline passed while queued; not run"),
    500: (e.MedinferError, "unexpected server error; quote the request id"),
    503: (e.ModelNotReadyError, "model 'cxr-pneumonia' is not serving"),
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses, each with an example."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        error, detail = _EXAMPLES[status]
        out[status] = {
            "description": HTTPStatus(status).phrase,
            "content": {
                PROBLEM_MEDIA_TYPE: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": _example(error, detail),
                }
            },
        }
    return out


def v2_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the v2 family's ``{"error": "..."}`` answers."""
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/V2Error"},
                    "example": {"error": _EXAMPLES[status][1]},
                }
            },
        }
        for status in statuses
    }


def normalise_openapi_errors(document: dict[str, Any]) -> None:
    """Document FastAPI's automatic 422s as what the handlers above answer: problem+json, or the
    v2 error body on that family. FastAPI's own ``HTTPValidationError`` schema is then unused and
    removed.

    Responses a route documents itself are left as written: some error statuses answer a body of
    their own (the readiness report on 503, the Store Instances Response on STOW-RS 409, an empty
    "not ready" 400 on the v2 health routes), and the document must say what is really sent.
    """
    for path, item in document.get("paths", {}).items():
        v2 = path == V2_PREFIX or path.startswith(V2_PREFIX + "/")
        for operation in item.values():
            for code, response in operation.get("responses", {}).items():
                if not code.isdigit() or int(code) not in _EXAMPLES:
                    continue
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if not schema.get("$ref", "").endswith("/HTTPValidationError"):
                    continue
                response.clear()
                response.update((v2_error_responses if v2 else problem_responses)(int(code))[int(code)])
    schemas = document.get("components", {}).get("schemas", {})
    text = json.dumps(document["paths"])
    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}" not in text:
            schemas.pop(name, None)


#: Errors any operation can answer with, whatever it does.
COMMON_ERRORS: Final[Sequence[int]] = (413, 500)
