"""A small client for integration engineers: encrypt a payload to the service's JWKS and post it.

    from app.client import MedinferClient
    client = MedinferClient("https://medinfer.hospital.example", api_key="mi_...")
    answer = client.predict("ehr-heart-disease", bundle_bytes, "application/fhir+json")

Payloads are sealed as compact JWE (ECDH-ES+A256KW or RSA-OAEP-256, A256GCM) to the service's
active key, so they stay encrypted through proxies and queues until medinfer opens them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwe
from joserfc.jwk import ECKey, RSAKey

_REGISTRY = jwe.JWERegistry(algorithms=["ECDH-ES+A256KW", "RSA-OAEP-256", "A256GCM"])
_REGISTRY.max_ciphertext_length = 1 << 31  # studies are large; the server enforces its own cap


def load_jwks(source: str, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """A JWKS from a file path or an http(s) URL (e.g. ``https://host/.well-known/jwks.json``)."""
    if source.startswith(("http://", "https://")):
        response = httpx.get(source, timeout=timeout_s)
        response.raise_for_status()
        jwks: dict[str, Any] = response.json()
        return jwks
    loaded: dict[str, Any] = json.loads(Path(source).read_text(encoding="utf-8"))
    return loaded


def encrypt(payload: bytes, content_type: str, jwks: dict[str, Any]) -> str:
    """Seal ``payload`` to the first encryption key of ``jwks`` (the service lists the active key first)."""
    candidates = [k for k in jwks.get("keys", []) if k.get("use", "enc") == "enc"]
    if not candidates:
        msg = "the JWKS holds no encryption key"
        raise ValueError(msg)
    jwk = candidates[0]
    key: ECKey | RSAKey = ECKey.import_key(jwk) if jwk["kty"] == "EC" else RSAKey.import_key(jwk)
    alg = jwk.get("alg") or ("ECDH-ES+A256KW" if jwk["kty"] == "EC" else "RSA-OAEP-256")
    header = {"alg": alg, "enc": "A256GCM", "cty": content_type, "kid": jwk["kid"]}
    return jwe.encrypt_compact(header, payload, key, registry=_REGISTRY)


class MedinferClient:
    def __init__(
        self, base_url: str, *, api_key: str, jwks: dict[str, Any] | None = None, timeout_s: float = 60
    ) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"})
        self._jwks = jwks

    def jwks(self) -> dict[str, Any]:
        if self._jwks is None:
            response = self._http.get("/.well-known/jwks.json")
            response.raise_for_status()
            self._jwks = response.json()
        return self._jwks

    def predict(
        self, model: str, payload: bytes, content_type: str, *, accept: str = "application/json"
    ) -> httpx.Response:
        """POST an encrypted payload to ``/v1/models/{model}/predict``."""
        sealed = encrypt(payload, content_type, self.jwks())
        return self._http.post(
            f"/v1/models/{model}/predict",
            content=sealed.encode(),
            headers={"Content-Type": "application/jose", "Accept": accept},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MedinferClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
