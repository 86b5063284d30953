"""training.phantoms: deterministic, well-formed, and positive phantoms differ where the lesion is."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.models.helpers import REPO_ROOT
from training import phantoms


def test_same_seed_same_image() -> None:
    for seed, positive in ((0, False), (1, True), (123456, True)):
        a = phantoms.generate(seed, positive)
        b = phantoms.generate(seed, positive)
        assert a.dtype == np.float32
        assert a.shape == (224, 224)
        assert np.array_equal(a, b)


def test_different_seeds_differ() -> None:
    a, b = phantoms.generate(10, False), phantoms.generate(11, False)
    assert np.mean(np.abs(a - b)) > 0.01


def test_range_and_rectangular_shape() -> None:
    img = phantoms.generate(5, True, rows=300, columns=240)
    assert img.shape == (300, 240)
    assert img.min() >= 0.0
    assert img.max() <= 1.0
    assert img.max() - img.min() > 0.5  # uses the dynamic range


def test_positive_adds_consolidation_inside_the_lungs() -> None:
    for seed in range(20, 26):
        neg = phantoms.generate_with_mask(seed, False)
        pos = phantoms.generate_with_mask(seed, True)
        assert neg.lesion_mask.max() == 0.0
        assert pos.lesion_mask.max() == 1.0
        inside = pos.lesion_mask > 0.5
        assert inside.sum() > 20
        diff = pos.image - neg.image
        # same patient and acquisition, so the difference is the (denser, brighter) consolidation
        assert diff[inside].mean() > 0.04
        assert diff[inside].mean() > 4 * np.abs(diff[pos.lesion_mask == 0]).mean()


def test_anatomy_lungs_darker_than_mediastinum() -> None:
    img = phantoms.generate(42, False)
    lung_right_of_patient = img[80:140, 40:80].mean()  # image left = patient's right
    mediastinum = img[60:120, 105:119].mean()
    assert mediastinum > lung_right_of_patient + 0.15


def test_batch_layout() -> None:
    x = phantoms.batch([1, 2, 3], [0, 1, 0], size=64)
    assert x.shape == (3, 1, 64, 64)
    assert x.dtype == np.float32
    assert np.array_equal(x[1, 0], phantoms.generate(2, True, 64))


def test_invalid_size_rejected() -> None:
    with pytest.raises(ValueError, match="rows and columns"):
        phantoms.generate(0, False, rows=8)


def test_generator_and_dicom_writer_import_only_numpy_and_pydicom() -> None:
    code = (
        "import sys; import training.phantoms, training.dicom_studies; "
        "bad = sorted(m for m in ('torch', 'sklearn', 'pandas', 'scipy', 'matplotlib', 'onnx', 'onnxruntime') "
        "if m in sys.modules); print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
