from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import PLACEHOLDER_SECRET, Settings


def test_production_refuses_placeholder_secrets() -> None:
    with pytest.raises(ValidationError, match="MEDINFER_AUDIT_HMAC_KEY, MEDINFER_PSEUDONYM_KEY"):
        Settings(env="production")


def test_production_refuses_short_secrets() -> None:
    with pytest.raises(ValidationError, match="MEDINFER_PSEUDONYM_KEY"):
        Settings(env="production", audit_hmac_key="a" * 40, pseudonym_key="short", key_encryption_key="c" * 40)


def test_production_accepts_strong_secrets() -> None:
    settings = Settings(env="production", audit_hmac_key="a" * 40, pseudonym_key="b" * 40, key_encryption_key="c" * 40)
    assert settings.audit_hmac_key.get_secret_value() != PLACEHOLDER_SECRET


def test_dev_defaults_use_sqlite_under_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path.resolve()}/medinfer.db"
    assert settings.async_sqlalchemy_url.startswith("sqlite+aiosqlite:///")
    assert settings.resolved_keys_dir == tmp_path / "keys"


def test_postgres_url_gets_the_psycopg_async_driver() -> None:
    settings = Settings(database_url="postgresql://u@db:5432/medinfer")
    assert settings.async_sqlalchemy_url == "postgresql+psycopg://u@db:5432/medinfer"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]


def test_environment_variables_use_the_medinfer_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDINFER_PORT", "9123")
    monkeypatch.setenv("MEDINFER_MAX_BODY_BYTES", "2048")
    settings = Settings()
    assert (settings.port, settings.max_body_bytes) == (9123, 2048)


def test_encryption_is_required_in_production_unless_configured_otherwise() -> None:
    strong = {"audit_hmac_key": "a" * 40, "pseudonym_key": "b" * 40, "key_encryption_key": "c" * 40}
    assert Settings(env="production", **strong).encryption_required is True
    assert Settings(env="production", require_encryption=False, **strong).encryption_required is False
    assert Settings(env="dev").encryption_required is False


def test_tls_settings_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        Settings(tls_certfile=tmp_path / "server.crt")
    with pytest.raises(ValidationError, match="mutual TLS"):
        Settings(tls_client_ca=tmp_path / "ca.crt")


def test_acknowledged_nonclinical_models_come_from_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS", '["cxr-pneumonia@2", "ehr-heart-disease@1"]')
    assert Settings().acknowledged == frozenset({"cxr-pneumonia@2", "ehr-heart-disease@1"})
    monkeypatch.delenv("MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS")
    assert Settings().acknowledged == frozenset()  # the default acknowledges nothing


@pytest.mark.parametrize("entry", ["cxr-pneumonia", "cxr-pneumonia@", "@1", "cxr-pneumonia@latest"])
def test_an_acknowledgement_must_name_one_version(entry: str) -> None:
    with pytest.raises(ValidationError, match="name@version"):
        Settings(acknowledged_nonclinical_models=[entry])


def test_imaging_routes_are_unset_by_default() -> None:
    """No model reads a PACS's studies until the site names it in MEDINFER_IMAGING_ROUTES."""
    assert Settings().imaging_routes is None
