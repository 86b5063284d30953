"""Registered HIS clients: sign-then-encrypt with replay protection, and results sealed to them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from joserfc import jwe, jws
from joserfc.jwk import ECKey
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk

from app.client import encrypt
from app.config import Settings
from app.domain import Scope
from app.main import create_app
from app.security.jwe import CLAIM_HEADERS
from app.security.keystore import KeyStore
from tests.conftest import register, wait_ready

BODY = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
SIGNING = jws.JWSRegistry(header_registry=CLAIM_HEADERS, algorithms=["ES256"], strict_check_header=False)


@pytest.fixture
def his() -> dict[str, ECKey]:
    return {"signing": ECKey.generate_key("P-256"), "encryption": ECKey.generate_key("P-256")}


@pytest.fixture
def setup(migrated: Settings, his: dict[str, ECKey]) -> Iterator[tuple[TestClient, str, str]]:
    KeyStore(migrated.resolved_keys_dir, migrated.key_encryption_key.get_secret_value()).load().generate("active")
    signer = register(
        migrated,
        Scope.INFER,
        client_id="his-signed",
        signing_jwk=his["signing"].as_dict(private=False),
        encryption_jwk=his["encryption"].as_dict(private=False) | {"kid": "his-enc-1"},
    )
    plain = register(migrated, Scope.INFER, client_id="his-plain")
    with TestClient(create_app(migrated)) as client:
        wait_ready(client)
        yield client, signer, plain


def _signed(key: ECKey, payload: bytes, **claims: Any) -> bytes:
    now = int(time.time())
    header = {
        "alg": "ES256",
        "cty": "application/json",
        "iss": "his-signed",
        "aud": "medinfer",
        "iat": now,
        "exp": now + 120,
        "jti": str(uuid.uuid4()),
    } | claims
    header = {k: v for k, v in header.items() if v is not None}
    return jws.serialize_compact(header, payload, key, registry=SIGNING).encode()


def _post(client: TestClient, key: str, body: bytes, **headers: str) -> Any:
    return client.post(
        "/v2/models/alpha/infer",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/jose", **headers},
    )


def _sealed(client: TestClient, inner: bytes, cty: str = "JWT") -> bytes:
    return encrypt(inner, cty, client.get("/.well-known/jwks.json").json()).encode()


@pytest.mark.parametrize("cty", ["JWT", "application/jwt", "JOSE"])
def test_the_nested_token_s_content_type_may_be_short_or_full(
    setup: tuple[TestClient, str, str], his: dict[str, ECKey], cty: str
) -> None:
    client, signer, _ = setup
    token = _sealed(client, _signed(his["signing"], json.dumps(BODY).encode()), cty=cty)
    assert _post(client, signer, token).status_code == 200


def test_a_signed_then_encrypted_payload_is_accepted_once(
    setup: tuple[TestClient, str, str], his: dict[str, ECKey]
) -> None:
    client, signer, _ = setup
    token = _sealed(client, _signed(his["signing"], json.dumps(BODY).encode()))
    assert _post(client, signer, token).status_code == 200
    replayed = _post(client, signer, token)
    assert replayed.status_code == 401
    assert "replay" in replayed.json()["error"]


@pytest.mark.parametrize(
    "claims",
    [
        {"iss": "someone-else"}, {"aud": "another-service"},
        {"exp": int(time.time()) - 600, "iat": int(time.time()) - 700},
        {"exp": int(time.time()) + 3600}, {"jti": None},
    ],
    ids=["issuer", "audience", "expired", "too-long-lived", "no-jti"],
)  # fmt: skip
def test_unacceptable_claims_are_refused(
    setup: tuple[TestClient, str, str], his: dict[str, ECKey], claims: dict[str, Any]
) -> None:
    client, signer, _ = setup
    response = _post(client, signer, _sealed(client, _signed(his["signing"], json.dumps(BODY).encode(), **claims)))
    assert response.status_code == 401


def test_a_signature_by_another_key_or_no_signature_is_refused(
    setup: tuple[TestClient, str, str],
) -> None:
    client, signer, _ = setup
    forged = _signed(ECKey.generate_key("P-256"), json.dumps(BODY).encode())
    assert _post(client, signer, _sealed(client, forged)).status_code == 401
    unsigned = _sealed(client, json.dumps(BODY).encode(), cty="application/json")
    response = _post(client, signer, unsigned)
    assert response.status_code == 401
    assert "must sign" in response.json()["error"]
    plain = client.post("/v2/models/alpha/infer", json=BODY, headers={"Authorization": f"Bearer {signer}"})
    assert plain.status_code == 415


def test_results_are_sealed_to_the_clients_key_and_open_with_an_independent_library(
    setup: tuple[TestClient, str, str], his: dict[str, ECKey]
) -> None:
    client, signer, _ = setup
    token = _sealed(client, _signed(his["signing"], json.dumps(BODY).encode()))
    response = _post(client, signer, token, Accept="application/jose")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/jose"
    opened = jwe.decrypt_compact(
        response.text, his["encryption"], registry=jwe.JWERegistry(algorithms=["ECDH-ES+A256KW", "A256GCM"])
    )
    assert opened.protected["cty"] == "application/json"
    assert json.loads(opened.plaintext or b"")["model_name"] == "alpha"
    private = jwcrypto_jwk.JWK(**his["encryption"].as_dict(private=True))
    token_view = jwcrypto_jwe.JWE()
    token_view.deserialize(response.text, key=private)
    assert json.loads(token_view.payload)["outputs"][0]["name"] == "probabilities"


def test_sealed_results_need_a_registered_encryption_key(setup: tuple[TestClient, str, str]) -> None:
    client, _, plain = setup
    response = client.post(
        "/v2/models/alpha/infer", json=BODY, headers={"Authorization": f"Bearer {plain}", "Accept": "application/jose"}
    )
    assert response.status_code == 406
