"""The HTTP server medinfer ships: uvicorn, configured from settings.

Everything about how connections are accepted and served (TLS, keep-alive, limits) is set here,
so ``medinfer serve`` and the tests that start a real server process run the same server.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from app.config import Settings


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for :func:`uvicorn.run` (or :class:`uvicorn.Config`)."""
    config: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,
        "timeout_graceful_shutdown": 30,
        "timeout_keep_alive": settings.keep_alive_s,
    }
    if settings.tls_certfile is not None:
        config |= {"ssl_certfile": str(settings.tls_certfile), "ssl_keyfile": str(settings.tls_keyfile)}
    if settings.tls_client_ca is not None:
        # Mutual TLS: the handshake fails without a certificate from this CA. Requests still
        # authenticate with an API key or bearer JWT (uvicorn does not pass the peer certificate on).
        config |= {"ssl_ca_certs": str(settings.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def serve(settings: Settings, create_app: Callable[[Settings], FastAPI]) -> None:
    """Run until stopped. With several workers each is its own process, built by ``app.main:app_factory``."""
    config = uvicorn_options(settings)
    if settings.workers > 1:
        # Each worker is its own process: their metrics must meet in files to add up.
        metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="medinfer-metrics-"))
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        uvicorn.run("app.main:app_factory", factory=True, workers=settings.workers, **config)
    else:
        uvicorn.run(create_app(settings), **config)
