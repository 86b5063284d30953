"""Administration: live model management, and API clients (register, list, revoke)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Path, Request, status

from app.domain import VersionStatus
from app.errors import (
    ClientExistsError,
    ClientNotFoundError,
    DatabaseUnavailableError,
    MedinferError,
    PermissionDeniedError,
)
from app.security.clients import (
    STORED_CLIENT_ID_PATTERN,
    client_store,
    list_clients,
    parse_scopes,
    register_client,
    revoke_client,
    undo_registration,
)
from app.security.oauth import MAX_CLIENT_ID_CHARS
from app.transport.http.bodies import authenticated_json, json_request_body
from app.transport.http.deps import ClientsAdmin, ContainerDep, DbDep, ModelsAdmin, clients_admin, record_action
from app.transport.http.problems import COMMON_ERRORS, PROBLEM_BASE, PROBLEM_MEDIA_TYPE, problem_responses
from app.transport.http.routes_models import ModelName
from app.transport.http.schemas import (
    ClientCredentials,
    ClientList,
    ClientRegistration,
    ModelLoadResult,
    ModelVersionStatus,
    RegisteredClient,
)

router = APIRouter(prefix="/v1/admin")
TAG: Final = "admin"
log = logging.getLogger(__name__)


def _statuses(name: str, statuses: tuple[VersionStatus, ...]) -> ModelLoadResult:
    return ModelLoadResult(model=name, versions=[ModelVersionStatus.of(s) for s in statuses])


@router.post(
    "/models/{name}/load",
    operation_id="loadModel",
    tags=[TAG],
    summary="Load or reload a model",
    description=(
        "Reads `model.toml` again, verifies and warms the versions its policy names beside the serving "
        "ones, then swaps atomically. Requests in flight finish on the version they started with. If a "
        "version is refused (checksum, load or warm-up failure) the previous one keeps serving and the "
        "answer is 409 with the reason. Scope `models:admin`."
    ),
    responses={**problem_responses(401, 403, 404, 409, 422, *COMMON_ERRORS)},
)
async def load_model(
    name: ModelName, request: Request, container: ContainerDep, principal: ModelsAdmin
) -> ModelLoadResult:
    try:
        statuses = await asyncio.to_thread(container.registry.load, name)
    except MedinferError as exc:
        await record_action(request, container, principal, "model.load", "failure", model=name, error_code=exc.code)
        raise
    finally:
        container.pipeline.retire_unserved()
    versions = {s.version: s.sha256 for s in statuses}
    await record_action(request, container, principal, "model.load", "success", model=name, versions=versions)
    return _statuses(name, statuses)


@router.post(
    "/models/{name}/unload",
    operation_id="unloadModel",
    tags=[TAG],
    summary="Stop serving a model",
    description=(
        "Requests already running finish; new ones get 503 until the model is loaded again. Scope `models:admin`."
    ),
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**problem_responses(401, 403, 404, 422, *COMMON_ERRORS)},
)
async def unload_model(name: ModelName, request: Request, container: ContainerDep, principal: ModelsAdmin) -> None:
    container.registry.unload(name)
    container.pipeline.retire_unserved()
    await record_action(request, container, principal, "model.unload", "success", model=name)


def _client_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Problem responses whose 404, 409 and 503 examples are about clients, not models."""
    responses = problem_responses(*statuses)
    for code, error, detail in (
        (404, ClientNotFoundError, "no client with this client_id (and key id) is registered"),
        (409, ClientExistsError, "a client with this client_id is already registered"),
        (503, DatabaseUnavailableError, "client store unavailable"),
    ):
        if code in responses:
            example = responses[code]["content"][PROBLEM_MEDIA_TYPE]["example"]
            example.update(
                type=PROBLEM_BASE + error.code,
                title=error.title,
                code=error.code,
                detail=detail,
                instance="/v1/admin/clients",
            )
    return responses


ClientId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_CLIENT_ID_CHARS,
        pattern=STORED_CLIENT_ID_PATTERN,
        examples=["his-epic-prod"],
        description=(
            "The client's id as registered, percent-encoded as a path segment. Any stored id is "
            "accepted, also one registered before ids were restricted (`HIS Epic` as `HIS%20Epic`, "
            "`lab/prod` as `lab%2Fprod`)."
        ),
    ),
]


@router.post(
    "/clients",
    operation_id="registerClient",
    tags=[TAG],
    summary="Register an API client",
    description=(
        "Creates a client and returns its API key once; only a salted hash of the key is stored. "
        "A `client_id` names one caller in the audit trail, so an id that holds an unrevoked key "
        "is refused (409); revoke it first to issue a new key under the same id. Send "
        "`application/json` (at most `MEDINFER_MAX_ADMIN_BODY_BYTES`, read only after the caller "
        "is authenticated). Audited as `client.register` with the new id, key id and scopes. "
        "Scope `clients:admin`."
    ),
    status_code=status.HTTP_201_CREATED,
    openapi_extra=json_request_body(ClientRegistration),
    responses={**_client_responses(400, 401, 403, 409, 415, 422, 503, *COMMON_ERRORS)},
)
async def create_client(
    request: Request,
    container: ContainerDep,
    db: DbDep,
    principal: ClientsAdmin,
    registration: Annotated[
        ClientRegistration,
        Depends(authenticated_json(ClientRegistration, clients_admin, lambda s: s.max_admin_body_bytes)),
    ],
) -> ClientCredentials:
    scopes = parse_scopes(registration.scopes)
    with client_store():
        new = await db.run_sync(
            lambda sync_db: register_client(
                sync_db,
                registration.client_id,
                scopes,
                encryption_jwk=registration.encryption_jwk,
                signing_jwk=registration.signing_jwk,
            )
        )
        await db.commit()
    granted = sorted(s.value for s in scopes)
    try:
        await record_action(
            request, container, principal, "client.register", "success",
            client_id=registration.client_id, key_id=new.key_id, scopes=granted,
        )  # fmt: skip
    except MedinferError:
        # No audit event, no key: the key was never shown, and the id must not stay taken.
        try:
            with client_store():
                await db.run_sync(lambda sync_db: undo_registration(sync_db, new.key_id))
                await db.commit()
        except DatabaseUnavailableError as undo_failed:
            # The caller learns why the registration failed (the audit error), not that the undo
            # did too; the unshown key stays registered until an operator revokes it by key id.
            # No traceback: the driver's message may quote the statement's parameters.
            log.error(  # noqa: TRY400
                "unaudited registration not undone: revoke its key",
                extra={
                    "event": "client.register_undo_failed",
                    "key_id": new.key_id,
                    "exc_type": type(undo_failed.__cause__).__name__,
                },
            )
        raise
    return ClientCredentials(client_id=registration.client_id, scopes=granted, api_key=new.api_key)


@router.get(
    "/clients",
    operation_id="listClients",
    tags=[TAG],
    summary="List API clients",
    description=(
        "Every registered key, revoked ones included, by client id: scopes, when it was created and "
        "revoked, and whether JWKs are registered. Never a key, hash or salt. Audited as "
        "`client.list`. Scope `clients:admin`."
    ),
    responses={**_client_responses(401, 403, 503, *COMMON_ERRORS)},
)
async def list_registered_clients(
    request: Request, container: ContainerDep, db: DbDep, principal: ClientsAdmin
) -> ClientList:
    with client_store():
        listed = await db.run_sync(list_clients)
    await record_action(request, container, principal, "client.list", "success", keys=len(listed))
    return ClientList(clients=[RegisteredClient.of(info) for info in listed])


@router.post(
    # ``:path``: a stored id may hold a "/" (sent as %2F, which the server decodes before routing).
    "/clients/{client_id:path}/revoke",
    operation_id="revokeClient",
    tags=[TAG],
    summary="Revoke an API client",
    description=(
        "Revokes every unrevoked key of the client and returns all of its keys. Idempotent. The key "
        "is refused at once by this process; other replicas may admit it for up to "
        "`MEDINFER_AUTH_CACHE_S` seconds (their cache of authenticated keys). A client cannot "
        "revoke itself (403): use another administrator or `medinfer clients revoke`. The id is "
        "free for a new registration afterwards. Audited as `client.revoke`. Scope `clients:admin`."
    ),
    responses={**_client_responses(401, 403, 404, 422, 503, *COMMON_ERRORS)},
)
async def revoke_registered_client(
    client_id: ClientId, request: Request, container: ContainerDep, db: DbDep, principal: ClientsAdmin
) -> ClientList:
    if client_id == principal.client_id:
        # Schemathesis and careless scripts alike would otherwise lock the last administrator out.
        await record_action(
            request, container, principal, "client.revoke", "failure", client_id=client_id, reason="self"
        )
        raise PermissionDeniedError("a client cannot revoke itself: use another administrator or the CLI")
    with client_store():
        keys = await db.run_sync(lambda sync_db: revoke_client(sync_db, client_id))
        await db.commit()
    container.principals.forget_client(client_id)
    # Revoked before it is audited: if the trail is down the caller gets 503 and may retry (the
    # revocation is idempotent); undoing a revocation for want of an audit event would be worse.
    await record_action(
        request, container, principal, "client.revoke", "success",
        client_id=client_id, key_ids=[k.key_id for k in keys],
    )  # fmt: skip
    return ClientList(clients=[RegisteredClient.of(info) for info in keys])
