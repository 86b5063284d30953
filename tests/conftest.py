"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.__main__ import main as cli
from app.config import Settings
from app.domain import Scope
from app.main import create_app
from tests.support.models import write_model

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    write_model(repo, "alpha", {"1": 1})
    write_model(repo, "beta", {"1": 2, "2": 3})
    return repo


@pytest.fixture
def settings(tmp_path: Path, model_repo: Path) -> Settings:
    return Settings(
        env="test",
        data_dir=tmp_path / "var",
        model_repository=model_repo,
        max_body_bytes=64 * 1024,
        max_tensor_bytes=1 << 20,
        auth_cache_s=0,  # tests revoke keys and expect it at once; the cache has its own test
    )


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Expose ``settings`` to the CLI, which reads the environment like in production."""
    monkeypatch.setenv("MEDINFER_ENV", settings.env)
    monkeypatch.setenv("MEDINFER_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MEDINFER_MODEL_REPOSITORY", str(settings.model_repository))
    if settings.database_url:
        monkeypatch.setenv("MEDINFER_DATABASE_URL", settings.database_url)
    return settings


@pytest.fixture
def migrated(cli_env: Settings) -> Settings:
    assert cli(["migrate"]) == 0
    return cli_env


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"service not ready after {timeout_s}s: {client.get('/readyz').json()}")


@pytest.fixture
def client(migrated: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(migrated), raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        yield test_client


def register(
    settings: Settings,
    *scopes: Scope,
    client_id: str = "test-client",
    encryption_jwk: dict[str, Any] | None = None,
    signing_jwk: dict[str, Any] | None = None,
) -> str:
    from app.__main__ import register_api_client

    return register_api_client(
        settings, client_id, list(scopes), encryption_jwk=encryption_jwk, signing_jwk=signing_jwk
    )


@pytest.fixture
def admin_key(migrated: Settings) -> str:
    return register(migrated, *Scope, client_id="admin")


@pytest.fixture
def reader_key(migrated: Settings) -> str:
    return register(migrated, Scope.MODELS_READ, client_id="reader")


def require_env(name: str) -> str:
    """Integration settings come from scripts/test-services.sh; without them the test fails."""
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the suite with `make test`, which starts the services")
    return value
