"""Bearer JWTs from the hospital's identity provider: pinned algorithms, iss/aud/exp/nbf, scopes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from app.config import Settings
from app.main import create_app
from tests.conftest import wait_ready

ISSUER = "https://keycloak.hospital.example/realms/clinical"


@pytest.fixture
def idp_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "idp-1"})


@pytest.fixture
def oauth_client(migrated: Settings, idp_key: RSAKey, tmp_path: Path) -> Iterator[TestClient]:
    jwks = tmp_path / "idp-jwks.json"
    jwks.write_text(json.dumps({"keys": [idp_key.as_dict(private=False)]}))
    settings = migrated.model_copy(update={"oauth_jwks_file": jwks, "oauth_issuer": ISSUER})
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def _token(key: Any, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": "medinfer",
        "exp": now + 300,
        "nbf": now - 5,
        "iat": now,
        "azp": "his-backend",
        "scope": "system/models:read system/Observation.read",
    } | claims
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": "idp-1"}, payload, key, algorithms=[alg])


def _get(client: TestClient, token: str) -> Any:
    return client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})


def test_a_valid_token_maps_to_a_principal_with_its_scopes(oauth_client: TestClient, idp_key: RSAKey) -> None:
    assert _get(oauth_client, _token(idp_key)).status_code == 200
    forbidden = oauth_client.post(
        "/v1/admin/models/alpha/unload", headers={"Authorization": f"Bearer {_token(idp_key)}"}
    )
    assert forbidden.status_code == 403


@pytest.mark.parametrize(
    "claims",
    [
        {"iss": "https://evil.example"},
        {"aud": "another-api"},
        {"exp": int(time.time()) - 120},
        {"nbf": int(time.time()) + 600},
        {"exp": None},
    ],
    ids=["issuer", "audience", "expired", "not-yet-valid", "no-expiry"],
)
def test_tokens_with_wrong_claims_are_refused(
    oauth_client: TestClient, idp_key: RSAKey, claims: dict[str, Any]
) -> None:
    response = _get(oauth_client, _token(idp_key, **claims))
    assert response.status_code == 401
    assert response.json()["detail"] == "bearer token is not valid for this service"


def test_tokens_signed_by_another_key_or_algorithm_are_refused(oauth_client: TestClient, idp_key: RSAKey) -> None:
    assert _get(oauth_client, _token(RSAKey.generate_key(2048, parameters={"kid": "idp-1"}))).status_code == 401
    # HS256 keyed with the public key: the classic algorithm-confusion forgery.
    confused = OctKey.import_key(json.dumps(idp_key.as_dict(private=False)).encode())
    assert _get(oauth_client, _token(confused, alg="HS256")).status_code == 401
    good = _token(idp_key)
    header, payload, signature = good.split(".")
    tampered = ".".join([header, payload, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")])
    assert _get(oauth_client, tampered).status_code == 401
