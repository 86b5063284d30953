"""``Annotated`` dependencies, declared once and used by every router."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, Header, Request, Response
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.container import Container
from app.domain import AuditRecord, Principal, RequestContext, Scope
from app.errors import (
    AuditUnavailableError,
    AuthenticationError,
    DatabaseUnavailableError,
    DecryptionError,
    EncryptionRequiredError,
    InvalidRequestError,
    NotAcceptableError,
    PermissionDeniedError,
    UnsupportedMediaTypeError,
)
from app.imaging.ingest import ImagingService
from app.observability.logging import request_id_var
from app.security.clients import authenticate
from app.security.failures import AuthFailureLog
from app.security.jwe import SIGNED_CTY, TokenPolicy, is_jose, open_payload, seal_for, verify_signed
from app.security.keys import API_KEY_PREFIX
from app.security.replay import accept_once

DEADLINE_HEADER = "X-Deadline-Ms"
log = logging.getLogger(__name__)


def get_container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


ContainerDep = Annotated[Container, Depends(get_container)]


def get_imaging(request: Request) -> ImagingService:
    imaging: ImagingService = request.app.state.imaging
    return imaging


ImagingDep = Annotated[ImagingService, Depends(get_imaging)]


async def get_db(container: ContainerDep) -> AsyncIterator[AsyncSession]:
    session = container.sessionmaker()
    try:
        yield session
    finally:
        # Closing a session whose connection died with the database must not turn the answer
        # (already a 503 from the route) into a 500 after the fact.
        try:
            await session.close()
        except SQLAlchemyError:
            log.warning("database session close failed", extra={"event": "db.close_failed"})


DbDep = Annotated[AsyncSession, Depends(get_db)]


def get_failure_log(request: Request) -> AuthFailureLog:
    """The service's tally of anonymous authentication failures (one per application).

    The lifespan creates and starts it beside the container and closes it before the audit
    writer; an application whose lifespan did not gets one here on first use, written by its
    periodic task (then only the open window is lost at shutdown).
    """
    state = request.app.state
    failures: AuthFailureLog | None = getattr(state, "auth_failures", None)
    if failures is None:
        container: Container = state.container
        failures = AuthFailureLog(container.pipeline.record, container.settings.auth_failure_interval_s)
        failures.start()
        state.auth_failures = failures
    return failures


async def get_principal(
    request: Request,
    container: ContainerDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    try:
        token = (authorization or "").partition(" ")[2].strip()
        if container.oauth is not None and token.count(".") == 2 and not token.startswith(API_KEY_PREFIX):  # noqa: PLR2004
            return container.oauth.principal(token)
        cached = container.principals.get(token) if token else None
        if cached is not None:
            return cached
        async with container.sessionmaker() as db:
            principal = await authenticate(db, authorization)
    except AuthenticationError as exc:
        # Counted one by one, audited as one event per reason per interval: an anonymous flood
        # must not grow the permanent trail (app.security.failures).
        container.metrics.auth_failures.labels(reason="api_key").inc()
        get_failure_log(request).note(exc.detail, request.client.host if request.client else None)
        raise
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError("credential store unavailable", retry_after_s=2) from exc
    container.principals.put(token, principal)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency that admits only principals holding ``scope``."""

    async def check(request: Request, container: ContainerDep, principal: PrincipalDep) -> Principal:
        if not principal.has(scope):
            await record_forbidden(request, container, principal, scope)
            raise PermissionDeniedError(f"scope {scope.value!r} required")
        return principal

    check.scope = scope  # type: ignore[attr-defined]  # read by the scope-table test
    return check


#: The one table of which scope each operation needs (None: open). Routes declare their scope with
#: the dependencies below; a contract test fails if a route and this table disagree.
OPERATION_SCOPES: Final[Mapping[str, Scope | None]] = {
    "getLiveness": None,
    "getReadiness": None,
    "getJwks": None,
    "getProblemType": None,
    "getMetrics": None,  # metrics:read when MEDINFER_METRICS_REQUIRE_SCOPE is on
    "v2GetServerLive": None,
    "v2GetServerReady": None,
    "v2GetServerMetadata": Scope.MODELS_READ,
    "v2GetModelReady": Scope.MODELS_READ,
    "v2GetModelVersionReady": Scope.MODELS_READ,
    "listModels": Scope.MODELS_READ,
    "getModel": Scope.MODELS_READ,
    "v2GetModelMetadata": Scope.MODELS_READ,
    "v2GetModelVersionMetadata": Scope.MODELS_READ,
    "predict": Scope.INFER,
    "v2ModelInfer": Scope.INFER,
    "v2ModelVersionInfer": Scope.INFER,
    "loadModel": Scope.MODELS_ADMIN,
    "unloadModel": Scope.MODELS_ADMIN,
    "registerClient": Scope.CLIENTS_ADMIN,
    "listClients": Scope.CLIENTS_ADMIN,
    "revokeClient": Scope.CLIENTS_ADMIN,
    "verifyAuditChain": Scope.AUDIT_READ,
    "listAuditEvents": Scope.AUDIT_READ,
    "exportAuditEvents": Scope.AUDIT_READ,
    "storeInstances": Scope.INFER,
    "storeStudyInstances": Scope.INFER,
    "recordFeedback": Scope.FEEDBACK_WRITE,
    "getModelPerformance": Scope.MODELS_READ,
}


def require_json(content_type: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaTypeError("expected Content-Type: application/json")


def request_deadline(request: Request, settings: Settings, timeout_s: float | None = None) -> float:
    """The request's deadline on ``time.monotonic()``: the earliest of a protocol timeout, the
    ``X-Deadline-Ms`` header and the server default."""
    candidates = [settings.default_deadline_ms / 1000.0]
    if timeout_s is not None:
        candidates.append(timeout_s)
    header = request.headers.get(DEADLINE_HEADER)
    if header is not None:
        try:
            ms = float(header)
        except ValueError as exc:
            raise InvalidRequestError(f"{DEADLINE_HEADER} must be a number of milliseconds") from exc
        if not math.isfinite(ms) or ms <= 0:
            raise InvalidRequestError(f"{DEADLINE_HEADER} must be positive")
        candidates.append(ms / 1000.0)
    return time.monotonic() + min(candidates)


def request_context(request: Request, principal: Principal | None, input_sha256: str | None = None) -> RequestContext:
    return RequestContext(
        actor=principal.client_id if principal else None,
        request_id=request_id_var.get(),
        source_ip=request.client.host if request.client else None,
        input_sha256=input_sha256,
    )


async def record_action(
    request: Request,
    container: Container,
    principal: Principal | None,
    action: str,
    outcome: str,
    *,
    model: str | None = None,
    **detail: object,
) -> None:
    """Audit a security-relevant action (model load, audit export...) taken through HTTP."""
    context = request_context(request, principal)
    await container.pipeline.record(
        AuditRecord(
            action=action,
            outcome=outcome,
            request_id=context.request_id,
            actor=context.actor,
            source_ip=context.source_ip,
            model=model,
            detail=detail,
        )
    )


async def record_forbidden(request: Request, container: Container, principal: Principal, scope: Scope) -> None:
    """Audit a refusal for want of a scope. The caller is authenticated, so one event per refusal
    is bounded by its own credentials. If the trail is unavailable the answer stays 403 (not 503):
    the request is refused either way, and the log keeps the refusal."""
    route = request.scope.get("route")
    operation = getattr(route, "operation_id", None) or "unknown"
    try:
        await record_action(
            request, container, principal, "auth.forbidden", "failure", scope=scope.value, operation=operation
        )
    except AuditUnavailableError:
        log.warning(
            "refusal not audited: audit trail unavailable",
            extra={"event": "auth.forbidden_unaudited", "scope": scope.value, "operation": operation},
        )


@dataclass(frozen=True, slots=True)
class Payload:
    """A request body as the pipeline should see it: decrypted if it came as JWE."""

    body: bytes
    media_type: str


def media_type_of(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


async def read_payload(request: Request, container: Container, principal: Principal) -> Payload:
    """Read the body; open it if it is a JWE (and check the signature inside, for clients that
    registered a signing key); refuse it if plain while encryption is required."""
    body = await request.body()
    media = media_type_of(request.headers.get("content-type"))
    if not is_jose(media):
        if container.settings.encryption_required or principal.signing_jwk is not None:
            raise EncryptionRequiredError("send the payload encrypted (application/jose) to the service JWKS")
        return Payload(body=body, media_type=request.headers.get("content-type", ""))
    try:
        # Opening a study-sized JWE takes milliseconds per megabyte: keep it off the event loop.
        opened = await asyncio.to_thread(open_payload, body, media, container.keys, container.settings.max_body_bytes)
    except DecryptionError as exc:
        container.metrics.decryption_failures.labels(reason=exc.reason).inc()
        with contextlib.suppress(AuditUnavailableError):
            await record_action(request, container, None, "decryption.failure", "failure", reason=exc.reason)
        raise
    nested = media_type_of(opened.content_type) in SIGNED_CTY
    if principal.signing_jwk is None and not nested:
        return Payload(body=opened.plaintext, media_type=opened.content_type)
    if principal.signing_jwk is None or not nested:
        container.metrics.auth_failures.labels(reason="signature").inc()
        raise AuthenticationError("this client must sign its payloads, then encrypt them")
    try:
        settings = container.settings
        signed = verify_signed(
            opened.plaintext,
            principal.signing_jwk,
            client_id=principal.client_id,
            audience=settings.jwt_audience,
            now=time.time(),
            policy=TokenPolicy(settings.token_max_lifetime_s, settings.token_clock_skew_s),
        )
        await accept_once(
            container.sessionmaker, principal.client_id, signed.jti, signed.expires_at,
            clock_skew_s=settings.token_clock_skew_s,
        )  # fmt: skip
    except AuthenticationError:
        container.metrics.auth_failures.labels(reason="signature").inc()
        raise
    return Payload(body=signed.payload, media_type=signed.content_type)


def sealed_response(
    principal: Principal, body: bytes, media_type: str, headers: dict[str, str] | None = None
) -> Response:
    """The response encrypted to the client's registered key (``Accept: application/jose``)."""
    if principal.encryption_jwk is None:
        raise NotAcceptableError("register an encryption key for this client to receive encrypted results")
    return Response(
        seal_for(body, media_type, principal.encryption_jwk), media_type="application/jose", headers=headers
    )


def wants_sealed(request: Request) -> bool:
    return "application/jose" in request.headers.get("accept", "")


ModelsReader = Annotated[Principal, Depends(require(Scope.MODELS_READ))]
ModelsAdmin = Annotated[Principal, Depends(require(Scope.MODELS_ADMIN))]
Inferrer = Annotated[Principal, Depends(require(Scope.INFER))]


async def metrics_access(
    request: Request,
    container: ContainerDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """``/metrics`` needs ``metrics:read`` when ``MEDINFER_METRICS_REQUIRE_SCOPE`` is on; else it
    is open (labels carry no identifiers; restrict it with a NetworkPolicy)."""
    if not container.settings.metrics_require_scope:
        return
    principal = await get_principal(request, container, authorization)
    if not principal.has(Scope.METRICS_READ):
        await record_forbidden(request, container, principal, Scope.METRICS_READ)
        raise PermissionDeniedError(f"scope {Scope.METRICS_READ.value!r} required")


AuditReader = Annotated[Principal, Depends(require(Scope.AUDIT_READ))]
#: One callable, so a route that also reads an authenticated body checks (and audits) the scope once.
clients_admin = require(Scope.CLIENTS_ADMIN)
ClientsAdmin = Annotated[Principal, Depends(clients_admin)]
JsonBody = Depends(require_json)
