"""cxr-pneumonia: committed artefacts are consistent, and ONNX equals PyTorch on phantoms."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.models.helpers import MODELS_DIR, REPO_ROOT, load_model_toml, ort_session
from training import dicom_studies, phantoms

NAME = "cxr-pneumonia"
MODEL_DIR = MODELS_DIR / NAME
CHECKPOINT = REPO_ROOT / "training" / "checkpoints" / "cxr_pneumonia_v1.pt"  # version 2 re-exports these weights
#: Version 1's held-out figures (metrics.json before the re-export): version 2 must keep them.
VERSION_1_FIGURES = {
    "validation": {"auroc": 0.976524, "tp": 450, "tn": 497, "fp": 3, "fn": 50},
    "test": {"auroc": 0.981641, "tp": 881, "tn": 989, "fp": 11, "fn": 119},
    "dicom_roundtrip": {"auroc": 0.989375, "tp": 75, "tn": 78, "fp": 2, "fn": 5},
}


@pytest.fixture(scope="module")
def spec() -> dict:
    return load_model_toml(NAME)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((MODEL_DIR / "metrics.json").read_text())


@pytest.fixture(scope="module")
def onnx_path(spec: dict):
    versions = sorted(int(v) for v in spec["versions"])
    return MODEL_DIR / str(versions[-1]) / "model.onnx"


@pytest.fixture(scope="module")
def session(onnx_path):
    return ort_session(onnx_path)


@pytest.fixture(scope="module")
def torch_net():
    from training.cxr_pneumonia import load_checkpoint

    return load_checkpoint(CHECKPOINT)


def _probs(session, x: np.ndarray) -> np.ndarray:
    (p,) = session.run(["probabilities"], {"image": x})
    return p


def _torch_probs(net, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()


def test_sha256_in_model_toml_matches_file(spec: dict, metrics: dict) -> None:
    for version, entry in spec["versions"].items():
        path = MODEL_DIR / version / "model.onnx"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    latest = max(spec["versions"], key=int)
    assert metrics["sha256"] == spec["versions"][latest]["sha256"]
    assert metrics["version"] == int(latest)
    assert hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest() == metrics["checkpoint_sha256"]


def test_sizes(onnx_path) -> None:
    assert onnx_path.stat().st_size < 25 * 1024 * 1024
    assert CHECKPOINT.stat().st_size < 25 * 1024 * 1024


def test_model_toml_matches_onnx_signature(spec: dict, session, onnx_path) -> None:
    import onnx

    assert spec["name"] == NAME == MODEL_DIR.name
    assert spec["labels"] == ["normal", "pneumonia"]
    assert spec["positive_label"] == "pneumonia"
    assert spec["not_for_clinical_use"] is True
    assert spec["batching"]["max_batch_size"] == 32
    assert spec["batching"]["max_queue_delay_ms"] == 5.0
    (inp,) = session.get_inputs()
    out = session.get_outputs()[0]
    assert spec["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 224, 224]}]
    assert spec["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}
    assert [o["name"] for o in spec["outputs"]] == [o.name for o in session.get_outputs()]
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(float)", [1, 224, 224])
    assert (out.name, out.type, out.shape[1]) == ("probabilities", "tensor(float)", 2)
    assert not isinstance(inp.shape[0], int)  # dynamic batch axis
    model = onnx.load(str(onnx_path), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    pre = spec["preprocessing"]
    assert pre["kind"] == "dicom"
    assert pre["resize"] == 224
    assert set(pre["modalities"]) == {"CR", "DX"}
    assert set(pre["sop_classes"]) == {str(u) for u in dicom_studies.SOP_CLASSES.values()}
    assert set(pre["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}


def test_card_and_metrics_say_synthetic_and_not_clinical(spec: dict, metrics: dict) -> None:
    card = (MODEL_DIR / spec["card"]).read_text()
    assert "Trained on synthetic data" in card
    assert "Not for clinical use" in card
    assert metrics["not_for_clinical_use"] is True
    assert spec["thresholds"]["default"] == metrics["threshold"]
    assert 0.5e9 <= metrics["flops"] <= 2e9
    assert f"{metrics['flops'] / 1e9:.3f} GFLOPs" in card
    assert metrics["timings"]["total_seconds"] < 30 * 60
    for key in ("accuracy", "sensitivity", "f1", "auroc"):
        assert 0.0 <= metrics["test"][key] <= 1.0
        assert f"{metrics['test'][key]:.3f}" in card or f"{100 * metrics['test'][key]:.1f} %" in card


def test_flop_count_matches_card(metrics: dict) -> None:
    from training.cxr_pneumonia import CXRResNet, count_flops

    assert count_flops(CXRResNet()) == metrics["flops"]


def test_onnx_equals_torch_on_seeded_phantoms(session, torch_net) -> None:
    seeds = [3_000_000 + i for i in range(6)]  # test-split seeds
    x = phantoms.batch(seeds, [i % 2 for i in range(6)], 224)
    p_onnx = _probs(session, x)
    p_torch = _torch_probs(torch_net, x)
    assert p_onnx.shape == (6, 2)
    assert p_onnx.dtype == np.float32
    np.testing.assert_allclose(p_onnx, p_torch, rtol=0, atol=1e-5)
    np.testing.assert_allclose(p_onnx.sum(axis=1), 1.0, atol=1e-6)
    # batch size does not change a row's result (dynamic batch axis)
    p_one = _probs(session, x[2:3])
    np.testing.assert_allclose(p_one, p_onnx[2:3], rtol=0, atol=1e-6)


def test_onnx_equals_torch_on_edge_inputs(session, torch_net) -> None:
    rng = np.random.default_rng(7)
    x = np.stack(
        [
            np.zeros((1, 224, 224), np.float32),  # constant image: standardisation's epsilon path
            np.ones((1, 224, 224), np.float32),
            rng.random((1, 224, 224), dtype=np.float32),
        ]
    )
    p_onnx = _probs(session, x)
    np.testing.assert_allclose(p_onnx, _torch_probs(torch_net, x), rtol=0, atol=1e-5)
    assert np.isfinite(p_onnx).all()


def test_model_separates_clear_phantoms(session, metrics: dict) -> None:
    """Sanity on fresh seeds: the mean P(pneumonia) of positives is well above negatives'."""
    seeds = list(range(5_000_000, 5_000_016))
    labels = [i % 2 for i in range(16)]
    p = _probs(session, phantoms.batch(seeds, labels, 224))
    y = np.asarray(labels)
    assert p[y == 1, 1].mean() - p[y == 0, 1].mean() > 0.4
    assert metrics["test"]["auroc"] > 0.8


def test_dicom_study_through_reference_preprocessing(session) -> None:
    raw = dicom_studies.study_bytes(
        seed=6_000_001,
        positive=True,
        rows=640,
        bits_stored=12,
        photometric="MONOCHROME1",
        modality="DX",
        transfer_syntax="JPEG2000Lossless",
    )
    x = dicom_studies.reference_preprocess(pydicom.dcmread(__import__("io").BytesIO(raw)))
    p = _probs(session, x)
    assert p.shape == (1, 2)
    assert abs(float(p.sum()) - 1.0) < 1e-5


def test_real_cr_chest_runs_end_to_end(session) -> None:
    """The real RG1 chest CR (MONOCHROME1, 15-bit, pydicom-data) goes through the same path.
    Only that it runs and gives a probability is checked: no accuracy claim on real images."""
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert path is not None, "pydicom-data must be installed (dev dependency)"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.Modality == "CR"
    x = dicom_studies.reference_preprocess(ds)
    assert x.shape == (1, 1, 224, 224)
    assert x.min() >= 0.0
    assert x.max() <= 1.0
    # after MONOCHROME1 inversion the mediastinum (centre column) is brighter than the lungs
    centre, lateral = x[0, 0, 60:140, 100:124].mean(), x[0, 0, 60:140, 40:70].mean()
    assert centre > lateral
    p = _probs(session, x)
    assert p.shape == (1, 2)
    assert np.isfinite(p).all()
    assert abs(float(p.sum()) - 1.0) < 1e-5


def test_embedding_output_is_the_checkpoint_penultimate_features(session, torch_net) -> None:
    import torch

    x = phantoms.batch([3_000_010, 3_000_011], [0, 1], 224)
    (emb,) = session.run(["embedding"], {"image": x})
    with torch.no_grad():
        expected = torch_net.features(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-4)


def test_reexport_kept_version_1_classification_figures(metrics: dict) -> None:
    """Same weights, same probabilities: the held-out figures are version 1's, unchanged."""
    for split, figures in VERSION_1_FIGURES.items():
        assert {k: metrics[split][k] for k in figures} == figures
    assert metrics["threshold"] == 0.6049
    assert metrics["probabilities_vs_previous_version_max_abs_diff"] <= 1e-5


def test_operating_points_name_the_split_their_figures_come_from(spec: dict, metrics: dict) -> None:
    points = spec["thresholds"]["operating_points"]
    assert set(points) == {"high_sensitivity", "youden"}
    for name, point in points.items():
        assert point["split"] == "validation", name
        assert point["sensitivity"] == metrics["operating_points"][name]["sensitivity"]
    card = (MODEL_DIR / spec["card"]).read_text()
    assert 'carry `split = "validation"`' in card
    assert "measured on the **validation** split" in card


def test_cam_output_is_the_checkpoint_class_activation_map(session, torch_net) -> None:
    """``cam`` = ReLU of the last stage weighted by w_pneumonia - w_normal, and the unrectified
    map's mean plus the bias difference is the log-odds of pneumonia (what the card claims)."""
    from training import cxr_cam

    x = phantoms.batch([3_000_020, 3_000_021, 3_000_022, 3_000_023], [0, 1, 0, 1], 224)
    cam, p = session.run(["cam", "probabilities"], {"image": x})
    assert cam.shape == (4, 7, 7)
    assert cam.dtype == np.float32
    assert (cam >= 0).all()
    raw, bias = cxr_cam.raw_maps(torch_net, x, positive=1)
    np.testing.assert_allclose(cam, np.maximum(raw, 0.0), rtol=0, atol=1e-3)
    log_odds = np.log(p[:, 1].astype(np.float64)) - np.log(p[:, 0].astype(np.float64))
    np.testing.assert_allclose(raw.mean(axis=(1, 2)) + bias, log_odds, rtol=0, atol=1e-3)
    # a row's map does not depend on its batch
    (one,) = session.run(["cam"], {"image": x[1:2]})
    np.testing.assert_allclose(one, cam[1:2], rtol=0, atol=1e-5)


def test_explain_section_declares_cam_and_the_card_reports_its_pointing_game(spec: dict, metrics: dict) -> None:
    assert spec["explain"] == {"method": "cam", "output": "cam"}
    assert {"name": "cam", "datatype": "FP32", "shape": [-1, 7, 7]} in spec["outputs"]
    game = metrics["cam"]["pointing_game"]
    assert game["n"] == VERSION_1_FIGURES["test"]["tp"] + VERSION_1_FIGURES["test"]["fn"]
    assert game["peak_within_tolerance"] > 0.5
    assert game["peak_within_tolerance"] > 3 * game["chance_within_tolerance"]
    card = (MODEL_DIR / spec["card"]).read_text()
    assert "## Explanations" in card
    assert f"{100 * game['peak_within_tolerance']:.1f} %" in card


def test_reexport_kept_the_other_outputs_byte_for_byte_in_value(metrics: dict) -> None:
    """Adding ``cam`` re-exported version 2 in place: the outputs it had did not move on the
    2000 test phantoms, and the OOD figures are the same (the export refuses otherwise)."""
    assert metrics["outputs_vs_replaced_graph_max_abs_diff"] == {
        "probabilities": 0.0,
        "embedding": 0.0,
        "ood_score": 0.0,
    }
    assert metrics["ood"]["threshold"] == 20.588
    assert metrics["ood"]["id_test_flagged_n"] == 23
