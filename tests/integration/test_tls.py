"""TLS and mutual TLS on the real server, with certificates made for the test."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.integration.conftest import base_env, free_port, medinfer

pytestmark = pytest.mark.integration


def _issue(
    directory: Path,
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif issuer is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


def _serve_tls(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        env=env | {"MEDINFER_HOST": "127.0.0.1", "MEDINFER_PORT": str(port)},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    handle.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(log.read_text())


def _context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def test_https_and_mutual_tls(tmp_path: Path, model_repo: Path) -> None:
    ca = _issue(tmp_path, "hospital-ca", None)
    _issue(tmp_path, "localhost", ca, server=True)
    _issue(tmp_path, "his-client", ca)
    env = base_env(tmp_path, model_repo, None) | {
        "MEDINFER_TLS_CERTFILE": str(tmp_path / "localhost.crt"),
        "MEDINFER_TLS_KEYFILE": str(tmp_path / "localhost.key"),
    }
    assert medinfer(env, "migrate").returncode == 0

    process, port = _serve_tls(env, tmp_path / "tls.log")
    try:
        ok = httpx.get(f"https://localhost:{port}/livez", verify=_context(tmp_path / "hospital-ca.crt"))
        assert ok.status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://localhost:{port}/livez", verify=ssl.create_default_context())
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0

    mutual = env | {"MEDINFER_TLS_CLIENT_CA": str(tmp_path / "hospital-ca.crt")}
    process, port = _serve_tls(mutual, tmp_path / "mtls.log")
    try:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"https://localhost:{port}/livez", verify=_context(tmp_path / "hospital-ca.crt"))
        with_cert = _context(tmp_path / "hospital-ca.crt", tmp_path / "his-client.crt", tmp_path / "his-client.key")
        assert httpx.get(f"https://localhost:{port}/livez", verify=with_cert).status_code == 200
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
