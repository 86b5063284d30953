"""cxr-pneumonia's out-of-distribution detector, checked on the served ONNX graph itself.

Real radiographs (pydicom-data RG1, every encoding), other anatomy and noise must score above
the declared threshold or trip the content checks; fresh in-distribution phantoms, also as
DICOM studies in every encoding the phantom writer offers, must mostly stay below it. The
content checks are applied as ``[versions.N.ood.content_checks]`` declares them: standard
deviation below ``min_std`` is blank/constant; a share of pixels within 1e-6 of 0 or 1 at or
above ``saturation_fraction`` is saturated.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.inference.spec import ModelSpec, OodSpec, load_spec
from app.preprocess.pixels import PixelRecipe, to_tensor
from tests.models.helpers import MODELS_DIR, ort_session
from training import dicom_studies, phantoms

NAME = "cxr-pneumonia"
MODEL_DIR = MODELS_DIR / NAME
RG1 = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
OTHER_ANATOMY = ("RG3_UNCR.dcm", "RG3_J2KI.dcm", "MR2_UNCR.dcm", "MR2_J2KI.dcm", "693_UNCR.dcm", "693_J2KR.dcm")
EPS = 1e-6


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_spec(MODEL_DIR)


@pytest.fixture(scope="module")
def version(spec: ModelSpec) -> str:
    return spec.served_versions()[-1]


@pytest.fixture(scope="module")
def ood(spec: ModelSpec, version: str) -> OodSpec:
    declared = spec.ood_of(version)
    assert declared is not None, "the served cxr-pneumonia version declares [ood]"
    return declared


@pytest.fixture(scope="module")
def threshold(ood: OodSpec) -> float:
    assert ood.threshold is not None
    return ood.threshold


@pytest.fixture(scope="module")
def session(version: str) -> Any:
    return ort_session(MODEL_DIR / version / "model.onnx")


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MODEL_DIR / "metrics.json").read_text())
    return data


def scores(session: Any, x: np.ndarray) -> np.ndarray:
    (s,) = session.run(["ood_score"], {"image": np.asarray(x, np.float32)})
    return np.asarray(s).reshape(len(x))


def content_flags(x: np.ndarray, ood: OodSpec) -> np.ndarray:
    assert ood.content_checks is not None
    flat = np.asarray(x, np.float64).reshape(len(x), -1)
    saturated = ((flat <= 0.0 + EPS) | (flat >= 1.0 - EPS)).mean(axis=1)
    return (flat.std(axis=1) < ood.content_checks.min_std) | (saturated >= ood.content_checks.saturation_fraction)


def read_sample(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name}: pydicom-data must be installed (dev dependency)"
    return pydicom.dcmread(io.BytesIO(Path(path).read_bytes()))


def test_served_version_declares_the_outputs_the_graph_has(spec: ModelSpec, version: str, session: Any) -> None:
    assert version == "2"
    assert list(spec.versions) == ["2"], "version 1's graph has no ood_score output, so it is gone"
    declared = [(o.name, o.datatype, o.shape) for o in spec.outputs]
    assert declared == [
        ("probabilities", "FP32", (-1, 2)),
        ("embedding", "FP32", (-1, 256)),
        ("ood_score", "FP32", (-1,)),
        ("cam", "FP32", (-1, 7, 7)),
    ]
    graph = {o.name: o for o in session.get_outputs()}
    assert list(graph) == ["probabilities", "embedding", "ood_score", "cam"]
    assert graph["probabilities"].shape[1:] == [2]
    assert graph["embedding"].shape[1:] == [256]
    assert len(graph["ood_score"].shape) == 1
    assert graph["cam"].shape[1:] == [7, 7]
    assert all(o.type == "tensor(float)" for o in graph.values())


def test_ood_table_is_declared_with_its_measured_figures(ood: OodSpec, metrics: dict[str, Any]) -> None:
    measured = metrics["ood"]
    assert ood.method == "mahalanobis-penultimate"
    assert ood.output == "ood_score"
    assert ood.threshold == measured["threshold"]
    assert ood.in_distribution_flagged == measured["id_test_flagged"] <= 0.05
    assert ood.content_checks is not None
    assert ood.content_checks.min_std == measured["content_checks"]["min_std"]
    assert ood.content_checks.saturation_fraction == measured["content_checks"]["saturation_fraction"]
    assert "Ledoit-Wolf" in ood.calibration
    assert "99th percentile" in ood.calibration


def test_every_rg1_encoding_scores_above_the_threshold(session: Any, threshold: float, spec: ModelSpec) -> None:
    """The real chest CR is outside what the phantom-trained model was validated on, whichever
    preprocessing (the training reference or the service's) produced the tensor."""
    recipe = PixelRecipe.from_preprocessing(spec.preprocessing, spec.inputs[0].shape)
    reference = np.concatenate([dicom_studies.reference_preprocess(read_sample(n)) for n in RG1])
    service = np.stack([to_tensor(read_sample(n), recipe) for n in RG1]).reshape(reference.shape)
    for x in (reference, service):
        s = scores(session, x)
        assert (s > threshold).all(), dict(zip(RG1, s.tolist(), strict=True))
        assert (s / threshold > 2.0).all(), "by a wide margin, not by rounding"


def test_other_anatomy_scores_above_the_threshold(session: Any, threshold: float) -> None:
    x = np.concatenate([dicom_studies.reference_preprocess(read_sample(n)) for n in OTHER_ANATOMY])
    s = scores(session, x)
    assert (s > threshold).all(), dict(zip(OTHER_ANATOMY, s.tolist(), strict=True))


def test_fresh_in_distribution_phantoms_mostly_stay_below(session: Any, threshold: float, ood: OodSpec) -> None:
    seeds = list(range(5_100_000, 5_100_200))  # no split, fit or calibration set uses these seeds
    x = phantoms.batch(seeds, [i % 2 for i in range(len(seeds))], 224)
    flagged = scores(session, x) > threshold
    assert flagged.mean() <= 0.05
    assert not content_flags(x, ood).any(), "no in-distribution phantom trips a content check"


def test_dicom_phantoms_in_every_encoding_mostly_stay_below(session: Any, threshold: float, ood: OodSpec) -> None:
    variants = list(
        itertools.product(
            ("ExplicitVRLittleEndian", "RLELossless", "JPEG2000Lossless", "JPEGLSLossless"),
            ("MONOCHROME1", "MONOCHROME2"),
            (8, 12, 16),
        )
    )
    xs = []
    for i, (syntax, photometric, bits) in enumerate(variants):
        raw = dicom_studies.study_bytes(
            seed=5_200_000 + i,
            positive=bool(i % 2),
            rows=512,
            bits_stored=bits,
            photometric=photometric,
            modality="DX" if i % 3 == 0 else "CR",
            transfer_syntax=syntax,
        )
        xs.append(dicom_studies.reference_preprocess(pydicom.dcmread(io.BytesIO(raw))))
    x = np.concatenate(xs)
    s = scores(session, x)
    flagged = [v for v, f in zip(variants, s > threshold, strict=True) if f]
    assert len(flagged) <= 0.05 * len(variants), flagged
    assert not content_flags(x, ood).any()


def test_noise_scores_above_the_threshold(session: Any, threshold: float) -> None:
    rng = np.random.default_rng(15)
    uniform = rng.random((4, 1, 224, 224))
    gaussian = np.clip(rng.normal(0.5, 0.15, (4, 1, 224, 224)), 0.0, 1.0)
    s = scores(session, np.concatenate([uniform, gaussian]))
    assert (s > threshold).all()


def test_blank_constant_and_saturated_images_trip_the_content_checks(ood: OodSpec) -> None:
    constant = np.stack([np.full((1, 224, 224), c) for c in (0.0, 0.3, 1.0)])
    nearly_blank = 0.5 + 0.001 * np.random.default_rng(3).standard_normal((1, 1, 224, 224))
    ramp = np.clip(np.linspace(-4.0, 5.0, 224), 0.0, 1.0) * np.ones((1, 1, 224, 1))  # 89 % at 0 or 1
    binary = (np.random.default_rng(4).random((1, 1, 224, 224)) > 0.5).astype(np.float64)
    x = np.concatenate([constant, nearly_blank, ramp, binary])
    assert content_flags(x, ood).all()


def test_blank_images_also_score_above_the_threshold(session: Any, threshold: float) -> None:
    """The network standardises each image, so every constant image reaches it as zeros: one
    embedding, far from the phantoms'. The content check names the reason; the score agrees."""
    s = scores(session, np.stack([np.full((1, 224, 224), c, np.float32) for c in (0.0, 0.5, 1.0)]))
    assert (s > threshold).all()
    np.testing.assert_allclose(s, s[0], rtol=1e-5)


def test_a_row_score_does_not_depend_on_its_batch(session: Any) -> None:
    seeds = [3_000_000 + i for i in range(4)]
    x = phantoms.batch(seeds, [0, 1, 0, 1], 224)
    together = scores(session, x)
    alone = np.concatenate([scores(session, x[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(alone, together, rtol=1e-5)


def test_card_reports_the_detector_and_every_rg1_score(metrics: dict[str, Any], spec: ModelSpec) -> None:
    card = (MODEL_DIR / spec.card).read_text()
    measured = metrics["ood"]
    assert "## Out-of-distribution detection" in card
    assert "real radiograph is outside its validated input" in card
    assert f"**{measured['threshold']:.3f}**" in card
    assert f"**{100 * measured['id_test_flagged']:.2f} %**" in card
    for group in ("real_radiographs", "other_anatomy", "noise", "blank_constant"):
        assert measured["groups"][group]["auroc"] >= 0.99
        assert measured["groups"][group]["flagged_either"] == 1.0
    for row in measured["groups"]["real_radiographs"]["per_file"]:
        assert row["ratio"] > 1.0
        assert f"| `{row['name']}` | {row['score']:.2f} | {row['ratio']:.2f} |" in card
