"""The OpenAPI document is a contract: clients are generated from it, so it must be complete
and must not drift from the code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.main import create_app

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    # Generating the document needs no database and no models: create_app performs no I/O.
    spec: dict[str, Any] = create_app(Settings(env="test")).openapi()
    return spec


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def test_committed_document_matches_the_generated_one(document: dict[str, Any]) -> None:
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert committed == document, "docs/openapi.json drifted: run `make openapi` and commit it"


def test_document_is_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")


def test_every_operation_has_a_stable_id_tags_and_summary(document: dict[str, Any]) -> None:
    ids = []
    for path, method, op in _operations(document):
        assert op.get("operationId"), f"{method.upper()} {path}"
        assert op.get("tags"), f"{method.upper()} {path}"
        assert op.get("summary"), f"{method.upper()} {path}"
        ids.append(op["operationId"])
    assert len(ids) == len(set(ids))
    assert {"getLiveness", "getReadiness", "listModels", "loadModel", "registerClient"} <= set(ids)


def test_every_error_response_is_problem_json_with_an_example(document: dict[str, Any]) -> None:
    for path, method, op in _operations(document):
        errors = {code: r for code, r in op["responses"].items() if code.startswith(("4", "5"))}
        assert "500" in errors, f"{method.upper()} {path} must document 500"
        for code, response in errors.items():
            if path == "/readyz" and code == "503":
                continue  # readiness answers its own report, documented separately
            if path.startswith("/dicomweb/studies") and code == "409":
                # PS3.18 10.5.3: "none stored" is a STOW-RS Store Instances Response, not a problem.
                assert list(response["content"]) == ["application/dicom+json"], f"{method.upper()} {path} {code}"
                assert response["content"]["application/dicom+json"]["example"]["00081198"], path
                continue
            content = response.get("content")
            if path.startswith("/v2"):
                if content is None:
                    assert code == "400", f"{method.upper()} {path} {code}"  # v2 health: 'not ready'
                    continue
                assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/V2Error"}
                assert content["application/json"]["example"]["error"]
                continue
            assert content is not None, f"{method.upper()} {path} {code}"
            assert list(content) == ["application/problem+json"], f"{method.upper()} {path} {code}"
            media = content["application/problem+json"]
            assert media["schema"] == {"$ref": "#/components/schemas/Problem"}
            assert media["example"]["status"] == int(code)


def test_every_success_response_has_an_example(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for path, method, op in _operations(document):
        for code, response in op["responses"].items():
            if not code.startswith("2"):
                continue
            if "content" not in response:
                assert code in {"204", "200"}, f"{method.upper()} {path} {code}"
                continue
            for media_type, media in response["content"].items():
                if media_type == "application/octet-stream":
                    continue
                ref = media.get("schema", {}).get("$ref", "")
                has_example = bool({"example", "examples"} & set(media)) or "example" in schemas.get(
                    ref.rsplit("/", 1)[-1], {}
                )
                assert has_example, f"{method.upper()} {path} {code} {media_type}"


def test_request_bodies_have_examples(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for path, method, op in _operations(document):
        body = op.get("requestBody")
        if body is None:
            continue
        for media_type, media in body["content"].items():
            if media_type == "application/octet-stream":
                continue
            name = media["schema"].get("$ref", "").rsplit("/", 1)[-1]
            assert "example" in media or "example" in schemas.get(name, {}), f"{method.upper()} {path}"


def test_protected_operations_declare_bearer_security(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    for path, method, op in _operations(document):
        if path.startswith(("/v1/", "/v2/models/")) or path == "/v2":
            assert op["security"] == [{"apiKey": []}], f"{method.upper()} {path}"
            assert "401" in op["responses"], f"{method.upper()} {path}"


def test_every_route_requires_exactly_the_scope_the_table_names() -> None:
    from fastapi.dependencies.models import Dependant
    from fastapi.routing import APIRoute

    from app.main import ROUTERS
    from app.transport.http.deps import OPERATION_SCOPES

    def scopes(dependant: Dependant) -> set[object]:
        found = {getattr(dependant.call, "scope", None)} - {None}
        for sub in dependant.dependencies:
            found |= scopes(sub)
        return found

    seen = {}
    for router in ROUTERS:
        for route in router.routes:
            if isinstance(route, APIRoute):
                required = scopes(route.dependant)
                assert len(required) <= 1, route.operation_id
                seen[route.operation_id] = next(iter(required), None)
    assert seen == dict(OPERATION_SCOPES)
