"""JSON request bodies read only after the caller is authenticated, and capped small.

FastAPI reads and parses a declared body before it resolves any dependency, so a route taking a
pydantic model would parse 60 MiB of JSON from anyone before checking a credential. A route uses
:func:`authenticated_json` instead: its dependency first resolves the route's scope dependency,
then reads at most ``limit`` bytes, then validates. The OpenAPI document still names the model
(:func:`json_request_body` for ``openapi_extra``; the model goes into ``DOCUMENTED_MODELS``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.config import Settings
from app.domain import Principal
from app.errors import PayloadTooLargeError
from app.transport.http.deps import ContainerDep, require_json

M = TypeVar("M", bound=BaseModel)


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refusing it (413) as soon as it is declared or seen to be longer than ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body exceeds the {limit}-byte limit for this operation")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body exceeds the {limit}-byte limit for this operation")
    return bytes(body)


def authenticated_json(
    model: type[M],
    principal: Callable[..., Awaitable[Principal]],
    limit: Callable[[Settings], int],
) -> Callable[..., Awaitable[M]]:
    """A dependency giving the validated ``model``, after ``principal`` (a scope check) has passed.

    Validation errors are the same 422 (400 for JSON that does not parse) a declared body gives.
    """

    # ``principal`` is a local: FastAPI resolves annotations from the module's globals (they are
    # strings here), so the dependency goes in the default, evaluated now.
    async def parse(
        request: Request,
        container: ContainerDep,
        _principal: Principal = Depends(principal),  # noqa: B008
    ) -> M:
        require_json(request.headers.get("content-type"))
        body = await read_capped(request, limit(container.settings))
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    return parse


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting ``model`` as the operation's required JSON body."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }
