"""Issue 17, findings 1, 5, 6 and 9, against a real `medinfer serve` over loopback sockets.

1. A signed payload replayed inside the clock-skew window after its ``exp`` (the ``jti`` row used
   to be dropped at ``exp``), and a token whose lifetime exceeds the configured maximum.
5. A 4,000-digit integer as a feature value (``float()`` overflowed: 500), in a record and in a
   v2 tensor; the refused record leaves an audit event.
6. A JWE JSON serialization whose unprotected header overrides the protected ``cty``.
9. A 250-character ``jti`` on PostgreSQL: with the client id it overflowed the 256-character
   column, a 503 with Retry-After that a client retries for ever.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwe, jws
from joserfc.jwk import ECKey

from app.client import encrypt
from app.security.jwe import CLAIM_HEADERS
from tests.conftest import REPO_ROOT
from tests.integration.conftest import Served, base_env, medinfer, register_key, serve

pytestmark = pytest.mark.integration

EHR = "ehr-heart-disease"
FEATURES = {
    "age": 63, "sex": "male", "cp": "typical-angina", "trestbps": 145, "chol": 233, "fbs": 1, "restecg": 2,
    "thalach": 150, "exang": 0, "oldpeak": 2.3, "slope": 3, "ca": 0, "thal": 6,
}  # fmt: skip
SIGNING = jws.JWSRegistry(header_registry=CLAIM_HEADERS, algorithms=["ES256"], strict_check_header=False)
PERMISSIVE = jwe.JWERegistry(algorithms=["ECDH-ES+A256KW", "A256GCM"])


class Service:
    def __init__(self, served: Served, signer: ECKey, signed_key: str, key: str) -> None:
        self.served = served
        self.signer = signer
        self.signed_key = signed_key
        self.key = key
        self.http = httpx.Client(base_url=served.base_url, timeout=30)
        self.jwks: dict[str, Any] = self.http.get("/.well-known/jwks.json").json()

    def predict(self, body: bytes, media: str, *, key: str | None = None) -> httpx.Response:
        return self.http.post(
            f"/v1/models/{EHR}/predict",
            content=body,
            headers={"Authorization": f"Bearer {key or self.key}", "Content-Type": media},
        )

    def signed(self, **claims: Any) -> bytes:
        """A sign-then-encrypt body (compact JWE around a compact JWS) for the signing client."""
        now = int(time.time())
        header = {
            "alg": "ES256", "cty": "application/json", "iss": "his-signed", "aud": "medinfer",
            "iat": now, "exp": now + 120, "jti": str(uuid.uuid4()),
        } | claims  # fmt: skip
        inner = jws.serialize_compact(
            header, json.dumps({"features": FEATURES}).encode(), self.signer, registry=SIGNING
        )
        return encrypt(inner.encode(), "JWT", self.jwks).encode()

    def events(self, **filters: str) -> list[dict[str, Any]]:
        page = self.http.get("/v1/audit/events", params=filters, headers={"Authorization": f"Bearer {self.key}"})
        assert page.status_code == 200, page.text
        events: list[dict[str, Any]] = page.json()["events"]
        return events


def _start(tmp_path: Path, database_url: str | None, **extra: str) -> Iterator[Service]:
    env = base_env(tmp_path, REPO_ROOT / "models", database_url) | extra
    assert medinfer(env, "migrate").returncode == 0
    keys = medinfer(env, "keys", "generate", "--state", "active")
    assert keys.returncode == 0, keys.stderr
    signer = ECKey.generate_key("P-256")
    jwk_file = tmp_path / "signing.jwk"
    jwk_file.write_text(json.dumps(signer.as_dict(private=False)), encoding="utf-8")
    registered = medinfer(
        env, "clients", "register", "--client-id", "his-signed", "--scope", "infer", "--signing-jwk", str(jwk_file)
    )
    assert registered.returncode == 0, registered.stderr
    signed_key = json.loads(registered.stdout)["api_key"]
    key = register_key(env, "integration", "infer", "audit:read")
    served = serve(env, tmp_path / "serve.log")
    service = Service(served, signer, signed_key, key)
    try:
        yield service
    finally:
        service.http.close()
        assert served.stop() == 0


@pytest.fixture
def on_sqlite(tmp_path: Path) -> Iterator[Service]:
    yield from _start(tmp_path, None)


@pytest.fixture
def on_postgres(tmp_path: Path, pg_url: str) -> Iterator[Service]:
    yield from _start(tmp_path, pg_url)


def test_finding_1_a_token_replayed_after_its_exp_but_inside_the_skew_is_refused(on_postgres: Service) -> None:
    service = on_postgres
    now = int(time.time())
    # Expired 30 s ago: still inside the 60 s skew, so accepted once. Its jti used to be dropped
    # at exp, i.e. at once, so the same bytes were accepted again and again until exp + skew.
    token = service.signed(iat=now - 90, exp=now - 30)
    first = service.predict(token, "application/jose", key=service.signed_key)
    assert first.status_code == 200, first.text
    for _ in range(3):
        again = service.predict(token, "application/jose", key=service.signed_key)
        assert again.status_code == 401, again.text
        assert "replay" in again.json()["detail"]


def test_finding_1_a_token_living_longer_than_the_maximum_is_refused(on_postgres: Service) -> None:
    service = on_postgres
    now = int(time.time())
    too_long = service.signed(iat=now, exp=now + 301)  # MEDINFER_TOKEN_MAX_LIFETIME_S defaults to 300
    refused = service.predict(too_long, "application/jose", key=service.signed_key)
    assert refused.status_code == 401, refused.text
    assert service.predict(
        service.signed(iat=now, exp=now + 300), "application/jose", key=service.signed_key
    ).is_success


def test_finding_9_a_long_jti_is_a_400_not_a_503_on_postgresql(on_postgres: Service) -> None:
    service = on_postgres
    long_jti = service.predict(service.signed(jti="j" * 250), "application/jose", key=service.signed_key)
    assert long_jti.status_code == 400, long_jti.text
    assert "retry-after" not in long_jti.headers
    assert "128" in long_jti.json()["detail"]
    # The longest accepted jti is stored (as a fixed-size digest) and then refused as a replay.
    token = service.signed(jti="j" * 128)
    assert service.predict(token, "application/jose", key=service.signed_key).status_code == 200
    assert service.predict(token, "application/jose", key=service.signed_key).status_code == 401


def test_finding_5_a_4000_digit_integer_is_refused_and_the_refusal_audited(on_sqlite: Service) -> None:
    service = on_sqlite
    huge = "9" * 4000
    body = json.dumps({"features": FEATURES | {"trestbps": 0}}).replace('"trestbps": 0', f'"trestbps": {huge}')
    response = service.predict(body.encode(), "application/json")
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "malformed-body"
    assert huge[:20] not in response.text
    refused = service.events(action="inference", outcome="failure")
    assert [event["detail"]["error_code"] for event in refused] == ["malformed-body"]
    assert refused[0]["model"] == EHR
    # The same number as a v2 tensor element: refused before numpy sees it.
    data = ", ".join([huge, *["1"] * 12])
    tensor = f'{{"inputs": [{{"name": "features", "shape": [1, 13], "datatype": "FP32", "data": [{data}]}}]}}'
    v2 = service.http.post(
        f"/v2/models/{EHR}/infer",
        content=tensor.encode(),
        headers={"Authorization": f"Bearer {service.key}", "Content-Type": "application/json"},
    )
    assert v2.status_code == 400, v2.text
    # A number beyond a double (1e400) and JSON's missing NaN are refused the same way.
    for spelling in ("1e400", "NaN"):
        odd = json.dumps({"features": FEATURES | {"chol": 0}}).replace('"chol": 0', f'"chol": {spelling}')
        assert service.predict(odd.encode(), "application/json").status_code == 400
    assert service.predict(json.dumps({"features": FEATURES}).encode(), "application/json").status_code == 200


def _json_jwe(service: Service, **headers: dict[str, str]) -> bytes:
    (jwk,) = service.jwks["keys"]
    protected = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "application/json", "kid": jwk["kid"]}
    message = jwe.FlattenedJSONEncryption(protected, json.dumps({"features": FEATURES}).encode())
    message.add_recipient(None, ECKey.import_key(jwk))
    document = jwe.encrypt_json(message, None, registry=PERMISSIVE)
    if "unprotected" in headers:
        document["unprotected"] = headers["unprotected"]
    if "recipient" in headers:
        document["header"] = {**document.get("header", {}), **headers["recipient"]}
    return json.dumps(document).encode()


def test_finding_6_an_unprotected_cty_cannot_change_how_the_payload_is_parsed(on_sqlite: Service) -> None:
    service = on_sqlite
    plain = service.predict(_json_jwe(service), "application/jose+json")
    assert plain.status_code == 200, plain.text
    for where in ("unprotected", "recipient"):
        for name, value in (("cty", "application/fhir+json"), ("alg", "RSA-OAEP-256"), ("enc", "A128GCM")):
            tampered = service.predict(_json_jwe(service, **{where: {name: value}}), "application/jose+json")
            assert tampered.status_code == 400, (where, name, tampered.text)
            assert tampered.json()["detail"] == "payload could not be decrypted"
    # A kid repeated with the protected value (joserfc writes one) is no conflict.
    (jwk,) = service.jwks["keys"]
    same = service.predict(_json_jwe(service, recipient={"kid": jwk["kid"]}), "application/jose+json")
    assert same.status_code == 200, same.text


def test_a_json_record_over_the_json_cap_is_413_declared_or_streamed(on_sqlite: Service) -> None:
    """Records are kilobytes: MEDINFER_MAX_JSON_BYTES (8 MiB), not the 64 MiB DICOM body cap."""
    service = on_sqlite
    padding = " " * (9 * 1024 * 1024)
    body = json.dumps({"features": FEATURES}).encode()[:-1] + padding.encode() + b"}"
    declared = service.predict(body, "application/fhir+json")
    assert declared.status_code == 413, declared.text

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    streamed = service.http.post(
        f"/v1/models/{EHR}/predict",
        content=chunks(),
        headers={"Authorization": f"Bearer {service.key}", "Content-Type": "application/json"},
    )
    assert streamed.status_code == 413, streamed.text
    assert service.predict(json.dumps({"features": FEATURES}).encode(), "application/json").status_code == 200
    # A v2 request as JSON only: millions of numbers would become tens of millions of Python objects.
    zeros = ", ".join(["0"] * (5 * 1024 * 1024))
    tensor = f'{{"inputs": [{{"name": "features", "shape": [1, 13], "datatype": "FP32", "data": [{zeros}]}}]}}'
    v2 = service.http.post(
        f"/v2/models/{EHR}/infer",
        content=tensor.encode(),
        headers={"Authorization": f"Bearer {service.key}", "Content-Type": "application/json"},
    )
    assert v2.status_code == 413, v2.text
    assert "binary tensor extension" in v2.json()["error"]
