"""Results sealed to a client's registered key: the algorithm its JWK names, or a refusal."""

from __future__ import annotations

from typing import Any

import pytest
from joserfc import jwe
from joserfc.jwk import ECKey, RSAKey

from app.security.jwe import seal_for


def _open(token: str, key: ECKey | RSAKey) -> tuple[dict[str, Any], bytes]:
    opened = jwe.decrypt_compact(token, key, algorithms=["ECDH-ES+A256KW", "RSA-OAEP-256", "A256GCM"])
    return opened.protected, opened.plaintext or b""


def test_an_rsa_key_for_key_wrapping_gets_rsa_oaep_256() -> None:
    key = RSAKey.generate_key(2048)
    public = key.as_dict(private=False) | {"alg": "RSA-OAEP-256", "use": "enc", "key_ops": ["wrapKey"]}
    header, plaintext = _open(seal_for(b'{"ok":1}', "application/json", public), key)
    assert header["alg"] == "RSA-OAEP-256"
    assert plaintext == b'{"ok":1}'


def test_an_ec_key_gets_ecdh_es_with_key_wrap_and_its_kid() -> None:
    key = ECKey.generate_key("P-256")
    header, _ = _open(seal_for(b"{}", "application/json", key.as_dict(private=False) | {"kid": "k1"}), key)
    assert (header["alg"], header["enc"], header["kid"]) == ("ECDH-ES+A256KW", "A256GCM", "k1")


@pytest.mark.parametrize(
    ("make", "extra"),
    [
        (lambda: RSAKey.generate_key(2048), {"alg": "RSA-OAEP"}),
        (lambda: ECKey.generate_key("P-256"), {"alg": "ECDH-ES"}),
        (lambda: ECKey.generate_key("P-256"), {"use": "sig"}),
    ],
    ids=["rsa-oaep-sha1", "ecdh-es-direct", "signing-key"],
)
def test_a_key_asking_for_another_algorithm_or_use_is_refused(make: Any, extra: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"sealed with|not an encryption key"):
        seal_for(b"{}", "application/json", make().as_dict(private=False) | extra)
