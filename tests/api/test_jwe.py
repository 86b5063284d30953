"""JWE-encrypted payloads: opened with the service's keys, refused alike when anything is off."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OctKey
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk

from app.__main__ import main as cli
from app.client import encrypt
from app.config import Settings
from app.domain import Scope
from app.main import create_app
from app.security.keystore import KeyStore
from tests.conftest import register, wait_ready

BODY = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
PERMISSIVE = jwe.JWERegistry(algorithms=["ECDH-ES+A256KW", "ECDH-ES+A128KW", "A256GCM", "A128GCM", "RSA-OAEP-256"])


@pytest.fixture
def keystore(migrated: Settings) -> KeyStore:
    store = KeyStore(migrated.resolved_keys_dir, migrated.key_encryption_key.get_secret_value()).load()
    store.generate("active")
    return store


@pytest.fixture
def secured(migrated: Settings, keystore: KeyStore) -> Iterator[tuple[TestClient, str]]:
    key = register(migrated, Scope.INFER, Scope.AUDIT_READ, client_id="his")
    with TestClient(create_app(migrated), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client, key


def _public(client: TestClient) -> tuple[str, ECKey]:
    (jwk,) = client.get("/.well-known/jwks.json").json()["keys"]
    return jwk["kid"], ECKey.import_key(jwk)


def _seal(client: TestClient, payload: bytes, cty: str = "application/json", **extra: Any) -> str:
    kid, public = _public(client)
    header = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": cty, "kid": kid} | extra
    return jwe.encrypt_compact(header, payload, public, registry=PERMISSIVE)


def _post(client: TestClient, key: str, body: str | bytes, media: str = "application/jose") -> Any:
    return client.post(
        "/v2/models/alpha/infer",
        content=body if isinstance(body, bytes) else body.encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": media},
    )


def test_jwks_publishes_public_keys_only(secured: tuple[TestClient, str]) -> None:
    client, _ = secured
    response = client.get("/.well-known/jwks.json")
    assert response.headers["content-type"] == "application/jwk-set+json"
    (jwk,) = response.json()["keys"]
    assert jwk["use"] == "enc"
    assert jwk["alg"] == "ECDH-ES+A256KW"
    assert "d" not in jwk


def test_an_encrypted_infer_request_is_answered_like_a_plain_one(secured: tuple[TestClient, str]) -> None:
    client, key = secured
    plain = client.post("/v2/models/alpha/infer", json=BODY, headers={"Authorization": f"Bearer {key}"}).json()
    sealed = _post(client, key, _seal(client, json.dumps(BODY).encode()))
    assert sealed.status_code == 200, sealed.text
    assert sealed.json()["outputs"] == plain["outputs"]


@pytest.mark.parametrize("cty", ["json", "JSON", "application/json; charset=utf-8"])
def test_a_short_content_type_means_application_slash_it(secured: tuple[TestClient, str], cty: str) -> None:
    # RFC 7515 4.1.10: a recipient MUST treat a cty without '/' as application/<cty>.
    client, key = secured
    response = _post(client, key, _seal(client, json.dumps(BODY).encode(), cty=cty))
    assert response.status_code == 200, response.text


def test_json_serialization_is_accepted(secured: tuple[TestClient, str]) -> None:
    client, key = secured
    kid, public = _public(client)
    protected = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "application/json", "kid": kid}
    message = jwe.FlattenedJSONEncryption(protected, json.dumps(BODY).encode())
    message.add_recipient(None, public)
    document = jwe.encrypt_json(message, None, registry=PERMISSIVE)
    response = _post(client, key, json.dumps(document), media="application/jose+json")
    assert response.status_code == 200, response.text


def test_an_independent_jose_implementation_interoperates(secured: tuple[TestClient, str]) -> None:
    client, key = secured
    jwks = client.get("/.well-known/jwks.json").text
    (public,) = jwcrypto_jwk.JWKSet.from_json(jwks)
    token = jwcrypto_jwe.JWE(
        json.dumps(BODY).encode(),
        json.dumps({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "application/json", "kid": public["kid"]}),
    )
    token.add_recipient(public)
    response = _post(client, key, token.serialize(compact=True))
    assert response.status_code == 200, response.text


def _crafted(client: TestClient, **extra: Any) -> str:
    """A token whose header our JOSE library would refuse to produce; refused before any crypto."""
    kid, _ = _public(client)
    header = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "application/json", "kid": kid} | extra
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return ".".join([encoded, "AAAA", "AAAAAAAAAAAAAAAA", "AAAA", "AAAAAAAAAAAAAAAAAAAAAA"])


def _flip(token: str, part: int) -> str:
    parts = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(parts[part] + "=" * (-len(parts[part]) % 4)))
    raw[len(raw) // 2] ^= 0x01
    parts[part] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    return ".".join(parts)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda c, t: _flip(t, 3), "decrypt"),
        (lambda c, t: _flip(t, 4), "decrypt"),
        (lambda c, t: _flip(t, 2), "decrypt"),
        (lambda c, t: _crafted(c, zip="DEF"), "zip"),
        (lambda c, t: _crafted(c, crit=["exp"], exp=1), "crit"),
        (lambda c, t: _seal(c, b"{}", cty="text/html"), "cty"),
        (lambda c, t: _seal(c, b"{}", kid="not-ours"), "kid"),
        (lambda c, t: t[:40], "malformed"),
    ],
    ids=["ciphertext", "tag", "iv", "zip", "crit", "cty", "unknown-kid", "truncated"],
)
def test_bad_jwes_are_refused_with_one_generic_message(
    secured: tuple[TestClient, str], mutate: Any, reason: str
) -> None:
    client, key = secured
    token = mutate(client, _seal(client, json.dumps(BODY).encode()))
    response = _post(client, key, token)
    assert response.status_code == 400
    assert response.json() == {"error": "payload could not be decrypted"}
    assert f'medinfer_decryption_failures_total{{reason="{reason}"}} 1.0' in client.get("/metrics").text


def test_disallowed_algorithms_are_refused(secured: tuple[TestClient, str]) -> None:
    client, key = secured
    kid, public = _public(client)
    weak = jwe.encrypt_compact(
        {"alg": "ECDH-ES+A128KW", "enc": "A128GCM", "cty": "application/json", "kid": kid},
        b"{}",
        public,
        registry=PERMISSIVE,
    )
    response = _post(client, key, weak)
    assert response.status_code == 400
    assert 'medinfer_decryption_failures_total{reason="alg"} 1.0' in client.get("/metrics").text
    secret = OctKey.generate_key(256)
    direct = jwe.encrypt_compact(
        {"alg": "dir", "enc": "A256GCM", "cty": "application/json", "kid": kid},
        b"{}",
        secret,
        registry=jwe.JWERegistry(algorithms=["dir", "A256GCM"]),
    )
    assert _post(client, key, direct).status_code == 400


def test_decryption_failures_are_audited(secured: tuple[TestClient, str]) -> None:
    client, key = secured
    _post(client, key, _flip(_seal(client, b"{}"), 4))
    events = client.get(
        "/v1/audit/events", params={"action": "decryption.failure"}, headers={"Authorization": f"Bearer {key}"}
    )
    (event,) = events.json()["events"]
    assert event["detail"] == {"reason": "decrypt"}


def test_plain_payloads_are_refused_when_encryption_is_required(migrated: Settings, keystore: KeyStore) -> None:
    settings_ = migrated.model_copy(update={"require_encryption": True})
    key = register(settings_, Scope.INFER, client_id="his")
    with TestClient(create_app(settings_)) as client:
        wait_ready(client)
        plain = client.post("/v2/models/alpha/infer", json=BODY, headers={"Authorization": f"Bearer {key}"})
        assert plain.status_code == 415
        assert plain.json()["error"].startswith("send the payload encrypted")
        assert _post(client, key, _seal(client, json.dumps(BODY).encode())).status_code == 200


def _sealed_to(stored_key: Any) -> str:
    return jwe.encrypt_compact(
        {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "application/json", "kid": stored_key.kid},
        json.dumps(BODY).encode(),
        ECKey.import_key(stored_key.public_jwk()),
        registry=PERMISSIVE,
    )


@pytest.mark.parametrize(("retention", "status"), [(timedelta(days=30), 200), (timedelta(seconds=-1), 400)])
def test_a_rotated_out_key_opens_payloads_only_during_its_retention(
    migrated: Settings, keystore: KeyStore, retention: timedelta, status: int
) -> None:
    key = register(migrated, Scope.INFER, client_id="his")
    old = keystore.keys[0]
    token = _sealed_to(old)
    keystore.rotate(retention)
    with TestClient(create_app(migrated)) as client:
        wait_ready(client)
        assert old.kid not in [k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]]
        assert _post(client, key, token).status_code == status


def test_keys_at_rest_are_sealed(keystore: KeyStore) -> None:
    text = "".join(p.read_text() for p in keystore.keys_dir.glob("*.key.json"))
    private = keystore.keys[0].key.as_dict(private=True)["d"]
    assert private not in text
    wrong = KeyStore(keystore.keys_dir, "another-key-encryption-key-of-enough-length")
    with pytest.raises(JoseError):
        wrong.load()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0, max_value=10_000), value=st.integers(min_value=0, max_value=255))
def test_mutated_jwes_never_succeed_and_never_500(secured: tuple[TestClient, str], position: int, value: int) -> None:
    client, key = secured
    token = bytearray(_seal(client, json.dumps(BODY).encode()).encode())
    index = position % len(token)
    if token[index] == value:
        return
    token[index] = value
    response = _post(client, key, bytes(token))
    assert response.status_code in {400, 415}, (response.status_code, response.text)


def test_the_encrypt_cli_and_the_client_module_produce_payloads_the_service_opens(
    secured: tuple[TestClient, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, key = secured
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(client.get("/.well-known/jwks.json").text)
    body_file = tmp_path / "body.json"
    body_file.write_text(json.dumps(BODY))
    assert cli(["encrypt", "--jwks", str(jwks_file), "--cty", "application/json", str(body_file)]) == 0
    sealed = capsys.readouterr().out.strip()
    assert _post(client, key, sealed).status_code == 200
    assert (
        _post(
            client, key, encrypt(json.dumps(BODY).encode(), "application/json", json.loads(jwks_file.read_text()))
        ).status_code
        == 200
    )


def test_payloads_larger_than_64_kb_open(migrated: Settings, keystore: KeyStore) -> None:
    from app.security.jwe import JOSE, open_payload

    payload = bytes(range(256)) * 4096  # 1 MiB, the size of a small DICOM instance
    token = encrypt(payload, "application/dicom", keystore.jwks()).encode()
    opened = open_payload(token, JOSE, keystore, 4 << 20)
    assert opened.plaintext == payload
    assert opened.content_type == "application/dicom"


def test_published_keys_export_their_rotation_due_date(secured: tuple[TestClient, str], keystore: KeyStore) -> None:
    client, _ = secured
    (stored,) = keystore.keys
    due = stored.created.timestamp() + 365 * 86400
    text = client.get("/metrics").text
    assert f'medinfer_key_expiry_timestamp_seconds{{kid="{stored.kid}"}} {due:.1f}'[:60] in text
