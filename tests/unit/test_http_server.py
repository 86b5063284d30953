"""The server options ``medinfer serve`` passes to uvicorn (no sockets here; the served behaviour
is tested in ``tests/integration/test_http_limits.py``)."""

from __future__ import annotations

import pickle
import resource
from pathlib import Path

from uvicorn.config import Config

from app.config import Settings
from app.transport.http.server import LimitedH11Protocol, raise_descriptor_limit, uvicorn_options


def test_the_protocol_and_its_limits_reach_worker_processes(tmp_path: Path) -> None:
    """With several workers uvicorn pickles its config into each process: the protocol must survive."""
    settings = Settings(env="test", data_dir=tmp_path, http_max_connections=77, http_header_timeout_s=3.5)
    protocol = pickle.loads(pickle.dumps(uvicorn_options(settings)["http"]))  # noqa: S301 - our own bytes
    assert protocol.func is LimitedH11Protocol
    limits = protocol.keywords["limits"]
    assert (limits.max_connections, limits.header_timeout_s) == (77, 3.5)


def test_uvicorn_takes_the_options(tmp_path: Path) -> None:
    settings = Settings(env="test", data_dir=tmp_path, http_max_header_bytes=4096, http_max_concurrency=9)
    config = Config(app="app.main:app_factory", factory=True, **uvicorn_options(settings))
    # Requests in flight are capped by the protocol; uvicorn's limit_concurrency (which counts idle
    # connections too) stays off.
    assert (config.h11_max_incomplete_event_size, config.limit_concurrency) == (4096, None)
    assert config.http.keywords["limits"].max_concurrency == 9  # type: ignore[union-attr]


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard - 1) if hard != resource.RLIM_INFINITY else 1024
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        assert raise_descriptor_limit(max_connections=16) == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
