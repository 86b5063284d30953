"""Administration: live model management and client registration."""

from __future__ import annotations

import asyncio
from typing import Final

from fastapi import APIRouter, Request, status

from app.domain import VersionStatus
from app.errors import MedinferError
from app.security.clients import parse_scopes, register_client
from app.transport.http.deps import ClientsAdmin, ContainerDep, DbDep, JsonBody, ModelsAdmin, record_action
from app.transport.http.problems import COMMON_ERRORS, problem_responses
from app.transport.http.routes_models import ModelName
from app.transport.http.schemas import ClientCredentials, ClientRegistration, ModelLoadResult, ModelVersionStatus

router = APIRouter(prefix="/v1/admin")
TAG: Final = "admin"


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


@router.post(
    "/clients",
    operation_id="registerClient",
    tags=[TAG],
    summary="Register an API client",
    description=(
        "Creates a client and returns its API key once; only the key's SHA-256 is stored. "
        "Send `application/json`. Scope `clients:admin`."
    ),
    status_code=status.HTTP_201_CREATED,
    dependencies=[JsonBody],
    responses={**problem_responses(400, 401, 403, 415, 422, *COMMON_ERRORS)},
)
async def create_client(registration: ClientRegistration, db: DbDep, _principal: ClientsAdmin) -> ClientCredentials:
    scopes = parse_scopes(registration.scopes)
    key = await db.run_sync(
        lambda sync_db: register_client(
            sync_db,
            registration.client_id,
            scopes,
            encryption_jwk=registration.encryption_jwk,
            signing_jwk=registration.signing_jwk,
        )
    )
    await db.commit()
    return ClientCredentials(client_id=registration.client_id, scopes=sorted(s.value for s in scopes), api_key=key)
