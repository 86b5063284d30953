"""ML teams drop a new version into the repository; a polling replica picks it up by itself."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.domain import Scope
from app.main import create_app
from tests.conftest import register, wait_ready
from tests.support.models import corrupt, write_model


@pytest.fixture
def polling_client(migrated: Settings) -> Iterator[TestClient]:
    settings = migrated.model_copy(update={"model_poll_interval_s": 0.1})
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def _reader(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {register(settings, Scope.MODELS_READ, client_id='poll-reader')}"}


def _ready_versions(client: TestClient, model: str) -> list[tuple[str, str]]:
    return [(m["version"], m["state"]) for m in client.get("/readyz").json()["models"] if m["model"] == model]


def _wait_for(client: TestClient, model: str, expected: list[tuple[str, str]]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _ready_versions(client, model) == expected:
            return
        time.sleep(0.05)
    raise AssertionError(f"{model}: {_ready_versions(client, model)} != {expected}")


def test_a_new_version_dropped_in_is_served_and_a_tampered_one_is_refused(
    polling_client: TestClient, migrated: Settings
) -> None:
    write_model(migrated.model_repository, "alpha", {"1": 1, "2": 4})
    _wait_for(polling_client, "alpha", [("2", "ready")])

    model_dir = write_model(migrated.model_repository, "alpha", {"1": 1, "2": 4, "3": 6})
    corrupt(model_dir / "3" / "model.onnx")
    _wait_for(polling_client, "alpha", [("2", "ready"), ("3", "failed")])
    assert polling_client.get("/v2/models/alpha/ready", headers=_reader(migrated)).status_code == 200


def test_a_new_model_is_loaded_and_a_removed_one_unloaded(polling_client: TestClient, migrated: Settings) -> None:
    write_model(migrated.model_repository, "gamma", {"1": 8})
    _wait_for(polling_client, "gamma", [("1", "ready")])
    (migrated.model_repository / "beta" / "model.toml").unlink()
    _wait_for(polling_client, "beta", [])
    assert polling_client.get("/v2/models/beta/ready", headers=_reader(migrated)).status_code == 404
