from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from app.domain import VersionState
from app.errors import ModelIntegrityError, ModelNotAcknowledgedError, ModelNotFoundError, ModelNotReadyError
from app.inference import session as session_module
from app.inference.registry import ClinicalUsePolicy, ModelRegistry
from app.observability.metrics import Metrics
from tests.support.models import corrupt, write_model


def _run(registry: ModelRegistry, name: str, version: str | None = None) -> np.ndarray:
    served = registry.get(name, version)
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    return np.asarray(served.loaded.session.run(["probabilities"], {"features": x})[0])


def test_loads_every_model_on_cpu_and_reports_real_providers(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    write_model(tmp_path, "beta", {"1": 2})
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    assert registry.models_ready()
    statuses = registry.statuses()
    assert [(s.model, s.version, s.state) for s in statuses] == [
        ("alpha", "1", VersionState.READY),
        ("beta", "1", VersionState.READY),
    ]
    assert all(s.providers[-1] == "CPUExecutionProvider" for s in statuses)
    probabilities = _run(registry, "alpha")
    assert probabilities.shape == (1, 2)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-6)


def test_checksum_mismatch_refuses_that_model_and_the_rest_keep_serving(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    beta = write_model(tmp_path, "beta", {"1": 2})
    corrupt(beta / "1" / "model.onnx")
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    assert registry.models_ready()
    by_model = {s.model: s for s in registry.statuses()}
    assert by_model["alpha"].state is VersionState.READY
    assert by_model["beta"].state is VersionState.FAILED
    assert by_model["beta"].error_code == ModelIntegrityError.code
    assert "does not match the pinned" in (by_model["beta"].error or "")
    with pytest.raises(ModelNotReadyError):
        registry.get("beta")


def test_reload_with_a_corrupted_new_version_keeps_the_old_one_serving(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    before = _run(registry, "alpha")
    in_flight = registry.get("alpha")

    write_model(tmp_path, "alpha", {"1": 1, "2": 7})
    corrupt(model_dir / "2" / "model.onnx")
    with pytest.raises(ModelIntegrityError):
        registry.load("alpha")

    assert registry.get("alpha").version == "1"
    np.testing.assert_array_equal(_run(registry, "alpha"), before)
    assert in_flight.version == "1"
    assert [(s.version, s.state) for s in registry.statuses()] == [
        ("1", VersionState.READY),
        ("2", VersionState.FAILED),
    ]


def test_a_version_corrupted_in_place_keeps_serving_and_reports_ready_with_the_refusal(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    before = _run(registry, "alpha")
    (loaded,) = registry.statuses()

    corrupt(model_dir / "1" / "model.onnx")  # the same version's file damaged, then a reload
    with pytest.raises(ModelIntegrityError):
        registry.load("alpha")

    np.testing.assert_array_equal(_run(registry, "alpha"), before)
    (status,) = registry.statuses()
    assert status.state is VersionState.READY  # it answers requests: not "failed"
    assert status.sha256 == loaded.sha256
    assert status.error_code == ModelIntegrityError.code
    assert (status.error or "").startswith("reload refused, the previous build keeps serving")


def test_reload_swaps_to_the_new_version_while_held_references_stay_valid(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    held = registry.get("alpha")
    old = _run(registry, "alpha")

    write_model(tmp_path, "alpha", {"1": 1, "2": 9})
    registry.load("alpha")

    assert registry.get("alpha").version == "2"
    assert not np.allclose(_run(registry, "alpha"), old)
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(held.loaded.session.run(["probabilities"], {"features": x})[0], old)


def test_unknown_model_and_version_are_not_found(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        registry.get("nope")
    with pytest.raises(ModelNotFoundError, match="no version '7'"):
        registry.get("alpha", "7")
    with pytest.raises(ModelNotFoundError):
        registry.load("nope")


def test_unload_stops_serving_until_loaded_again(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    registry.unload("alpha")
    with pytest.raises(ModelNotReadyError):
        registry.get("alpha")
    registry.load("alpha")
    assert registry.get("alpha").version == "1"


def test_not_ready_before_the_first_load_and_ready_for_an_empty_repository(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    assert not registry.models_ready()
    registry.load_all()
    assert registry.models_ready()


def test_a_repository_whose_every_model_fails_is_not_ready(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    corrupt(model_dir / "1" / "model.onnx")
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    assert not registry.models_ready()


def test_graph_that_differs_from_its_spec_is_refused(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    toml = model_dir / "model.toml"
    toml.write_text(toml.read_text().replace('name = "features"', 'name = "pixels"'))
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    (status,) = registry.statuses()
    assert status.error_code == "model-load-failed"
    assert "differs from model.toml" in (status.error or "")


def test_missing_cuda_falls_back_to_cpu_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("alpha", "beta"):
        model_dir = write_model(tmp_path, name, {"1": 1})
        toml = model_dir / "model.toml"
        toml.write_text(
            toml.read_text() + '\n[runtime]\nexecution_providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]\n'
        )
    session_module._unusable.clear()
    registry = ModelRegistry(tmp_path)
    with caplog.at_level(logging.WARNING, logger="app.inference.session"):
        registry.load_all()
    providers = {s.providers for s in registry.statuses()}
    assert len(providers) == 1
    (loaded,) = providers
    assert loaded[-1] == "CPUExecutionProvider"
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "ort.provider_fallback"]
    assert len(warnings) == (0 if "CUDAExecutionProvider" in loaded else 1)


# -- the production gate for not-for-clinical-use models ------------------------------------


def _refused_count(metrics: Metrics, model: str, version: str) -> float:
    value = metrics.registry.get_sample_value(
        "medinfer_model_versions_refused_total", {"model": model, "version": version, "reason": "not_acknowledged"}
    )
    return value or 0.0


def test_production_refuses_an_unacknowledged_demo_version_before_loading_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """write_model's models say not_for_clinical_use = true, like the shipped reference models."""
    write_model(tmp_path, "alpha", {"1": 1})
    corrupt(write_model(tmp_path, "beta", {"1": 2}) / "1" / "model.onnx")  # never read: refused first
    metrics = Metrics()
    registry = ModelRegistry(tmp_path, policy=ClinicalUsePolicy(production=True), metrics=metrics)
    with caplog.at_level(logging.WARNING, logger="app.inference.registry"):
        registry.load_all()
    statuses = {s.model: s for s in registry.statuses()}
    for name in ("alpha", "beta"):
        assert statuses[name].state is VersionState.FAILED
        assert statuses[name].error_code == ModelNotAcknowledgedError.code
        assert f"MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS names {name}@1" in (statuses[name].error or "")
        assert _refused_count(metrics, name, "1") == 1
    refused = [r for r in caplog.records if getattr(r, "event", None) == "model.refused"]
    assert sorted((getattr(r, "model", ""), getattr(r, "reason", "")) for r in refused) == [
        ("alpha", "not_acknowledged"),
        ("beta", "not_acknowledged"),
    ]
    assert not [r for r in caplog.records if r.exc_info]  # a policy, not a failure: no traceback
    # Ready: the refusal is the configured outcome, and /readyz details say why.
    assert registry.models_ready()
    with pytest.raises(ModelNotAcknowledgedError):
        registry.get("alpha")
    with pytest.raises(ModelNotAcknowledgedError):
        registry.get("alpha", "1")


def test_production_serves_an_acknowledged_version_only(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    write_model(tmp_path, "beta", {"1": 2, "2": 3}, latest_n=2)
    policy = ClinicalUsePolicy(production=True, acknowledged=frozenset({"alpha@1", "beta@2"}))
    registry = ModelRegistry(tmp_path, policy=policy, metrics=Metrics())
    registry.load_all()
    states = {(s.model, s.version): (s.state, s.error_code) for s in registry.statuses()}
    assert states == {
        ("alpha", "1"): (VersionState.READY, None),
        ("beta", "1"): (VersionState.FAILED, ModelNotAcknowledgedError.code),
        ("beta", "2"): (VersionState.READY, None),
    }
    assert registry.get("beta").version == "2"
    with pytest.raises(ModelNotAcknowledgedError):
        registry.get("beta", "1")
    assert policy.withholds_results(registry.get("alpha").spec)  # served, but never to a PACS


def test_outside_production_demo_models_serve_as_before(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    policy = ClinicalUsePolicy(production=False)
    registry = ModelRegistry(tmp_path, policy=policy, metrics=Metrics())
    registry.load_all()
    assert [s.state for s in registry.statuses()] == [VersionState.READY]
    assert not policy.withholds_results(registry.get("alpha").spec)


def test_a_real_failure_keeps_readiness_red_even_beside_a_policy_refusal(tmp_path: Path) -> None:
    write_model(tmp_path, "alpha", {"1": 1})
    corrupt(write_model(tmp_path, "beta", {"1": 2}) / "1" / "model.onnx")
    registry = ModelRegistry(
        tmp_path, policy=ClinicalUsePolicy(production=True, acknowledged=frozenset({"beta@1"})), metrics=Metrics()
    )
    registry.load_all()
    codes = {s.model: s.error_code for s in registry.statuses()}
    assert codes == {"alpha": ModelNotAcknowledgedError.code, "beta": ModelIntegrityError.code}
    assert not registry.models_ready()


def test_a_feature_contract_that_cannot_apply_refuses_the_version_at_load(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "alpha", {"1": 1})
    toml = model_dir / "model.toml"
    # Four declared features for a three-column input: refused when loading, not on each request.
    toml.write_text(
        toml.read_text(encoding="utf-8")
        + '\n[preprocessing]\nkind = "fhir"\nfeature_order = ["a", "b", "c", "d"]\n'
        + "".join(f'\n[[preprocessing.features]]\nindex = {i}\nname = "{n}"\n' for i, n in enumerate("abcd")),
        encoding="utf-8",
    )
    registry = ModelRegistry(tmp_path)
    registry.load_all()
    (status,) = registry.statuses()
    assert status.state is VersionState.FAILED
    assert status.error_code == "model-spec-invalid"
    assert status.version == "1"
    assert "feature" in (status.error or "")
