"""Opening JWE-encrypted request bodies (RFC 7516/7518) and sealing responses, with joserfc.

Only ECDH-ES+A256KW and RSA-OAEP-256 key wrapping with A256GCM content encryption pass; ``zip``
(compression bombs) and any ``crit`` extension are refused; the protected header is read and
checked before any cryptography, and every failure reads the same to the caller so nothing is
learned about keys or padding. The decrypted body then takes the ordinary path.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from joserfc import jwe, jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.registry import HeaderParameter

from app.errors import AuthenticationError, DecryptionError, MalformedBodyError
from app.security.keystore import KeyStore

JOSE: Final = "application/jose"
JOSE_JSON: Final = "application/jose+json"
ALLOWED_ALG: Final = frozenset({"ECDH-ES+A256KW", "RSA-OAEP-256"})
ALLOWED_ENC: Final = frozenset({"A256GCM"})
ALLOWED_CTY: Final = frozenset(
    {
        "application/dicom",
        "application/fhir+json",
        "application/json",
        "multipart/related",
        "application/octet-stream",
        "application/jwt",
        "application/jose",
    }
)


def full_media_type(cty: str) -> str:
    """RFC 7515 4.1.10 (and RFC 7516 4.1.12): a ``cty`` without a '/' means ``application/<cty>``,
    so ``JWT``, ``json`` or ``fhir+json`` are the full types; parameters are kept."""
    media, separator, parameters = cty.partition(";")
    media = media.strip()
    if media and "/" not in media:
        media = f"application/{media}"
    return media + (f";{parameters}" if separator else "")


def _cty(header: Mapping[str, Any]) -> str:
    return full_media_type(str(header.get("cty", ""))).split(";", 1)[0].strip().lower()


@functools.cache
def _registry(max_bytes: int) -> jwe.JWERegistry:
    """The allow-list, with joserfc's 64 KB ciphertext ceiling raised to the body cap (DICOM is big)."""
    registry = jwe.JWERegistry(algorithms=[*ALLOWED_ALG, *ALLOWED_ENC])
    registry.max_ciphertext_length = max_bytes * 4 // 3 + 4
    return registry


_MAX_HEADER: Final = 8192
_GENERIC: Final = "payload could not be decrypted"
#: RFC 7519 section 5.3: claims replicated as JWS header parameters (the payload is the study).
CLAIM_HEADERS: Final = {
    "iss": HeaderParameter("Issuer: the client id", "str"),
    "aud": HeaderParameter("Audience: this service", "str"),
    "iat": HeaderParameter("Issued at (seconds)", "int"),
    "exp": HeaderParameter("Expires at (seconds)", "int"),
    "jti": HeaderParameter("Unique token id, accepted once", "str"),
}
ALLOWED_JWS_ALG: Final = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
_JWS_REGISTRY: Final = jws.JWSRegistry(header_registry=CLAIM_HEADERS, algorithms=list(ALLOWED_JWS_ALG))


@dataclass(frozen=True, slots=True)
class Opened:
    plaintext: bytes
    content_type: str


def is_jose(media_type: str) -> bool:
    return media_type in {JOSE, JOSE_JSON}


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _compact_header(body: bytes) -> tuple[dict[str, Any], str]:
    compact = body.decode("ascii").strip()
    parts = compact.split(".")
    if len(parts) != 5:  # noqa: PLR2004 - JWE compact serialization has five parts
        raise DecryptionError(_GENERIC, reason="malformed")
    if len(parts[0]) > _MAX_HEADER:
        raise DecryptionError(_GENERIC, reason="header")
    header = json.loads(_b64(parts[0]))
    if not isinstance(header, dict):
        raise DecryptionError(_GENERIC, reason="malformed")
    return header, compact


#: A one-recipient JSON serialization holds four objects at most (the document, its shared and
#: per-recipient headers, ``recipients``) and a dozen members; base64url holds no brackets or
#: commas. Counting them first keeps ``json`` from building millions of objects from a body of
#: ``[{},{},...]``.
_MAX_JSON_BRACKETS: Final = 16
_MAX_JSON_COMMAS: Final = 64


def _json_header(body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The joint header of a one-recipient JSON serialization (protected, shared, per-recipient)."""
    if body.count(b"[") + body.count(b"{") > _MAX_JSON_BRACKETS or body.count(b",") > _MAX_JSON_COMMAS:
        raise DecryptionError(_GENERIC, reason="malformed")
    document = json.loads(body)
    if not isinstance(document, dict) or "aad" in document or len(str(document.get("protected", ""))) > _MAX_HEADER:
        raise DecryptionError(_GENERIC, reason="header")
    recipients = document.get("recipients", [document])
    if not isinstance(recipients, list) or len(recipients) != 1 or not isinstance(recipients[0], dict):
        raise DecryptionError(_GENERIC, reason="malformed")
    protected = json.loads(_b64(document["protected"]))
    shared, per_recipient = document.get("unprotected") or {}, recipients[0].get("header") or {}
    if not all(isinstance(part, dict) for part in (protected, shared, per_recipient)):
        raise DecryptionError(_GENERIC, reason="malformed")
    return _joint_header(protected, shared, per_recipient), document


#: Read from the integrity-protected header only: an on-path party can rewrite the unprotected
#: ones, and these decide how the payload is decrypted and then parsed.
PROTECTED_ONLY: Final = frozenset({"alg", "enc", "kid", "cty"})


def _joint_header(protected: dict[str, Any], shared: dict[str, Any], per_recipient: dict[str, Any]) -> dict[str, Any]:
    """RFC 7516 section 7.2.1: the three header sets are disjoint, their union is the JOSE header.

    A name given two different values is refused rather than resolved either way. ``alg``,
    ``enc``, ``kid`` and ``cty`` are read from the protected header only: one of them outside it
    is refused unless it repeats the protected value exactly (joserfc, for one, copies a key's
    ``kid`` into the per-recipient header), so an on-path party can change none of them, and an
    unprotected ``cty`` can never change how the decrypted payload is parsed.
    """
    sets = (protected, shared, per_recipient)
    for index, first in enumerate(sets):
        for second in sets[index + 1 :]:
            if any(first[name] != second[name] for name in first.keys() & second.keys()):
                raise DecryptionError(_GENERIC, reason="header")
    for unprotected in (shared, per_recipient):
        for name in PROTECTED_ONLY & unprotected.keys():
            if name not in protected:
                raise DecryptionError(_GENERIC, reason="header")
    if "cty" not in protected:
        raise DecryptionError(_GENERIC, reason="cty")
    return {**shared, **per_recipient, **protected}


def _allowed(value: object, allowed: frozenset[str]) -> bool:
    # A header value may be any JSON: a list or an object in a frozenset test raises TypeError.
    return isinstance(value, str) and value in allowed


def _check_header(header: dict[str, Any]) -> None:
    if not _allowed(header.get("alg"), ALLOWED_ALG):
        raise DecryptionError(_GENERIC, reason="alg")
    if not _allowed(header.get("enc"), ALLOWED_ENC):
        raise DecryptionError(_GENERIC, reason="enc")
    if "zip" in header:
        raise DecryptionError(_GENERIC, reason="zip")
    if "crit" in header:
        raise DecryptionError(_GENERIC, reason="crit")
    if _cty(header) not in ALLOWED_CTY:
        raise DecryptionError(_GENERIC, reason="cty")


def open_payload(body: bytes, media_type: str, keys: KeyStore, max_bytes: int) -> Opened:
    """Decrypt a JWE body. Raises :class:`DecryptionError` (reason code for metrics only)."""
    if len(body) > max_bytes:
        raise DecryptionError(_GENERIC, reason="size")
    try:
        header, serialized = _compact_header(body) if media_type == JOSE else _json_header(body)
    except RecursionError:  # JSON nested past the interpreter's limit, in a header of 8 KiB
        raise DecryptionError(_GENERIC, reason="malformed") from None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise DecryptionError(_GENERIC, reason="malformed") from exc
    _check_header(header)
    stored = keys.decryption_keys().get(str(header.get("kid", "")))
    if stored is None or stored.alg != header["alg"]:
        raise DecryptionError(_GENERIC, reason="kid")
    try:
        if isinstance(serialized, str):
            plaintext = jwe.decrypt_compact(serialized, stored.key, registry=_registry(max_bytes)).plaintext
        else:
            plaintext = jwe.decrypt_json(cast(Any, serialized), stored.key, registry=_registry(max_bytes)).plaintext
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise DecryptionError(_GENERIC, reason="decrypt") from exc
    return Opened(plaintext=plaintext or b"", content_type=full_media_type(str(header["cty"])))


SIGNED_CTY: Final = frozenset({"application/jwt", "application/jose"})  # full types, compared lower-cased
MAX_JTI_CHARS: Final = 128


@dataclass(frozen=True, slots=True)
class SignedPayload:
    payload: bytes
    content_type: str
    jti: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """How long a signed payload may live, and the clock difference tolerated on its times."""

    max_lifetime_s: int = 300
    clock_skew_s: int = 60


def verify_signed(
    token: bytes,
    signing_jwk: Mapping[str, Any],
    *,
    client_id: str,
    audience: str,
    now: float,
    policy: TokenPolicy | None = None,
) -> SignedPayload:
    """Check the JWS a registered client put inside its JWE (sign, then encrypt).

    The claims travel in the JWS protected header (the payload is the study or record itself):
    ``iss`` must be the client, ``aud`` this service, ``iat``/``exp`` current within the clock
    skew and at most ``policy.max_lifetime_s`` apart, and ``jti`` present (the caller checks it
    is new, and remembers it until ``exp`` plus the skew). Raises :class:`AuthenticationError`
    with a generic message; a ``jti`` longer than 128 characters is :class:`MalformedBodyError`
    (400: resending the same token cannot succeed).
    """
    policy = policy or TokenPolicy()
    try:
        key = import_public_jwk(signing_jwk)
        obj = jws.deserialize_compact(token, key, registry=_JWS_REGISTRY)
        header = obj.protected
    except (JoseError, ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise AuthenticationError("signed payload does not verify") from exc
    jti = header.get("jti")
    if isinstance(jti, str) and len(jti) > MAX_JTI_CHARS:
        raise MalformedBodyError(f"the signed payload's jti is longer than {MAX_JTI_CHARS} characters")
    iat, exp = header.get("iat"), header.get("exp")
    skew = policy.clock_skew_s
    valid = (
        header.get("iss") == client_id
        and header.get("aud") == audience
        and isinstance(iat, int)
        and isinstance(exp, int)
        and iat - skew <= now < exp + skew
        and 0 < exp - iat <= policy.max_lifetime_s
        and isinstance(jti, str)
        and len(jti) > 0
    )
    if not valid or _cty(header) not in ALLOWED_CTY:
        raise AuthenticationError("signed payload claims are not acceptable")
    return SignedPayload(
        payload=obj.payload or b"",
        content_type=full_media_type(str(header["cty"])),
        jti=str(jti),
        expires_at=int(header["exp"]),
    )


def import_public_jwk(jwk: Mapping[str, Any]) -> ECKey | RSAKey | OKPKey:
    data = dict(jwk)
    if "d" in data:
        msg = "a private key where a public one belongs"
        raise ValueError(msg)
    kty = data.get("kty")
    if kty == "EC":
        return ECKey.import_key(data)
    if kty == "RSA":
        return RSAKey.import_key(data)
    if kty == "OKP":
        return OKPKey.import_key(data)
    msg = f"unsupported key type {kty!r}"
    raise ValueError(msg)


def seal_for(body: bytes, content_type: str, client_jwk: Mapping[str, Any]) -> str:
    """Encrypt a response to the client's registered key (compact JWE, A256GCM).

    ECDH-ES+A256KW for an EC key, RSA-OAEP-256 for an RSA key. A JWK that names another ``alg``,
    or says it is for signatures (``use: sig``), is refused (:class:`ValueError`), so that a
    client never gets a result sealed with an algorithm it did not ask for. ``key_ops`` is not
    consulted: joserfc checks "encrypt", where RFC 7517 names "wrapKey" for key wrapping.
    """
    data = {name: value for name, value in client_jwk.items() if name != "key_ops"}
    if data.get("use", "enc") != "enc":
        msg = "not an encryption key"
        raise ValueError(msg)
    key = import_public_jwk(data)
    alg = "ECDH-ES+A256KW" if isinstance(key, ECKey) else "RSA-OAEP-256"
    if data.get("alg", alg) != alg:
        msg = f"results are sealed with {alg} for this key type"
        raise ValueError(msg)
    header: dict[str, Any] = {"alg": alg, "enc": "A256GCM", "cty": content_type}
    if "kid" in client_jwk:
        header["kid"] = client_jwk["kid"]
    return jwe.encrypt_compact(header, body, key, registry=_registry(len(body) + 1024))
