from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import ModelSpecError
from app.inference.spec import iter_model_dirs, load_spec
from tests.support.models import write_model


def test_valid_spec_loads_with_versions_and_thresholds(tmp_path: Path) -> None:
    spec = load_spec(write_model(tmp_path, "alpha", {"1": 1, "2": 2}))
    assert spec.name == "alpha"
    assert spec.labels == ("negative", "positive")
    assert spec.thresholds is not None
    assert spec.thresholds.default == 0.5
    assert spec.served_versions() == ["2"]
    assert spec.inputs[0].shape == (-1, 3)


def test_latest_n_serves_the_newest_versions_in_numeric_order(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"2": 1, "10": 2, "9": 3}, latest_n=2)
    assert load_spec(model_dir).served_versions() == ["9", "10"]


def test_unknown_key_is_refused_with_its_name(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    toml = model_dir / "model.toml"
    toml.write_text(toml.read_text() + '\n[extra_table]\nkey = "value"\n')
    with pytest.raises(ModelSpecError, match="extra_table"):
        load_spec(model_dir)


def test_bad_sha256_is_refused(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    toml = model_dir / "model.toml"
    text = toml.read_text()
    toml.write_text(text.replace('sha256 = "', 'sha256 = "XYZ'))
    with pytest.raises(ModelSpecError, match=r"versions\.1\.sha256"):
        load_spec(model_dir)


def test_name_must_match_its_folder(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    renamed = model_dir.rename(tmp_path / "gamma")
    with pytest.raises(ModelSpecError, match="differs from folder"):
        load_spec(renamed)


def test_positive_label_must_be_a_label(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    toml = model_dir / "model.toml"
    toml.write_text(toml.read_text().replace('positive_label = "positive"', 'positive_label = "maybe"'))
    with pytest.raises(ModelSpecError, match="positive_label"):
        load_spec(model_dir)


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    (model_dir / "model.toml").write_text("name = ")
    with pytest.raises(ModelSpecError, match="not valid TOML"):
        load_spec(model_dir)


def test_repository_lists_only_folders_with_a_model_toml(tmp_path: Path) -> None:
    write_model(tmp_path, "beta", {"1": 1})
    write_model(tmp_path, "alpha", {"1": 1})
    (tmp_path / "notes").mkdir()
    assert [p.name for p in iter_model_dirs(tmp_path)] == ["alpha", "beta"]
    assert list(iter_model_dirs(tmp_path / "missing")) == []
