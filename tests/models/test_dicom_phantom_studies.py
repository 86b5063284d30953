"""training.dicom_studies: valid CR/DX Part 10 files in every supported transfer syntax."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import UID

from training import dicom_studies, phantoms

SYNTAXES = list(dicom_studies.TRANSFER_SYNTAXES)


def _expected_stored(seed: int, positive: bool, rows: int, columns: int, bits: int, photometric: str) -> np.ndarray:
    img = phantoms.generate(seed, positive, rows, columns).astype(np.float64)
    top = (1 << bits) - 1
    stored = np.rint(img * top)
    return (top - stored if photometric == "MONOCHROME1" else stored).astype(np.int64)


@pytest.mark.parametrize("transfer_syntax", SYNTAXES)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_roundtrip_each_syntax_and_photometric(transfer_syntax: str, photometric: str, tmp_path: Path) -> None:
    modality = "DX" if photometric == "MONOCHROME1" else "CR"
    path = tmp_path / "study.dcm"
    dicom_studies.write_phantom_study(
        path,
        seed=11,
        positive=True,
        rows=192,
        columns=160,
        bits_stored=12,
        photometric=photometric,
        modality=modality,
        transfer_syntax=transfer_syntax,
        patient_id="PID-42",
        patient_name="Doe^Jane",
    )
    assert path.read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == dicom_studies.TRANSFER_SYNTAXES[transfer_syntax]
    assert ds.SOPClassUID == dicom_studies.SOP_CLASSES[modality] == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
        assert UID(uid).is_valid
    assert ds.Modality == modality
    assert ds.BodyPartExamined == "CHEST"
    assert ds.ViewPosition == "PA"
    assert ds.PatientID == "PID-42"
    assert str(ds.PatientName) == "Doe^Jane"
    assert ds.PhotometricInterpretation == photometric
    assert (ds.Rows, ds.Columns, ds.BitsStored, ds.BitsAllocated, ds.HighBit) == (192, 160, 12, 16, 11)
    assert ds.PixelRepresentation == 0
    assert ds.SamplesPerPixel == 1
    assert float(ds.RescaleSlope) == 1.0
    assert float(ds.RescaleIntercept) == 0.0
    assert float(ds.WindowWidth) == 4096.0
    assert float(ds.WindowCenter) == 2048.0
    if modality == "DX":
        assert ds.PresentationIntentType == "FOR PRESENTATION"
    arr = ds.pixel_array
    assert arr.shape == (192, 160)
    np.testing.assert_array_equal(arr.astype(np.int64), _expected_stored(11, True, 192, 160, 12, photometric))


@pytest.mark.parametrize("bits", [8, 10, 14, 16])
@pytest.mark.parametrize("transfer_syntax", SYNTAXES)
def test_bit_depths_are_lossless(bits: int, transfer_syntax: str) -> None:
    buf = io.BytesIO()
    dicom_studies.write_phantom_study(
        buf, seed=3, positive=False, rows=96, bits_stored=bits, transfer_syntax=transfer_syntax
    )
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert ds.BitsStored == bits
    assert ds.BitsAllocated == (8 if bits == 8 else 16)
    arr = ds.pixel_array
    assert int(arr.max()) <= (1 << bits) - 1
    np.testing.assert_array_equal(arr.astype(np.int64), _expected_stored(3, False, 96, 96, bits, "MONOCHROME2"))


def test_deterministic_bytes_and_uids() -> None:
    kw = {"seed": 9, "positive": True, "rows": 128, "transfer_syntax": "JPEGLSLossless", "patient_id": "P1"}
    a, b = dicom_studies.study_bytes(**kw), dicom_studies.study_bytes(**kw)
    assert a == b
    other = pydicom.dcmread(io.BytesIO(dicom_studies.study_bytes(**{**kw, "seed": 10})))
    first = pydicom.dcmread(io.BytesIO(a))
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.StudyInstanceUID != first.StudyInstanceUID


def test_explicit_study_uid_is_used() -> None:
    study = pydicom.uid.generate_uid(entropy_srcs=["test-study"])
    ds = dicom_studies.write_phantom_study(None, seed=1, positive=False, rows=64, study_uid=study)
    assert ds.StudyInstanceUID == study


def test_rescale_and_window_in_rescaled_units() -> None:
    ds = dicom_studies.phantom_dataset(
        seed=2, positive=False, rows=64, bits_stored=10, rescale_slope=2.0, rescale_intercept=-1000.0
    )
    assert float(ds.WindowCenter) == 2.0 * 512 - 1000.0
    assert float(ds.WindowWidth) == 2.0 * 1024
    x = dicom_studies.reference_preprocess(ds, 64)[0, 0]
    np.testing.assert_allclose(x, phantoms.generate(2, False, 64), atol=1.5 / 1023)


def test_reference_preprocess_undoes_monochrome1_and_matches_the_phantom() -> None:
    outs = {}
    for pi, ts in (("MONOCHROME1", "JPEG2000Lossless"), ("MONOCHROME2", "RLELossless")):
        raw = dicom_studies.study_bytes(
            seed=4, positive=True, rows=224, bits_stored=16, photometric=pi, transfer_syntax=ts
        )
        outs[pi] = dicom_studies.reference_preprocess(pydicom.dcmread(io.BytesIO(raw)))
        assert outs[pi].shape == (1, 1, 224, 224)
        assert outs[pi].dtype == np.float32
    np.testing.assert_allclose(outs["MONOCHROME1"], outs["MONOCHROME2"], atol=1e-6)
    np.testing.assert_allclose(outs["MONOCHROME2"][0, 0], phantoms.generate(4, True, 224), atol=1e-4)


def test_reference_preprocess_without_window_uses_min_max() -> None:
    ds = dicom_studies.phantom_dataset(seed=6, positive=False, rows=64, window=False)
    assert "WindowCenter" not in ds
    x = dicom_studies.reference_preprocess(ds, 32)
    assert x.shape == (1, 1, 32, 32)
    assert 0.0 <= x.min() < 0.05
    assert 0.95 < x.max() <= 1.0


@pytest.mark.parametrize("shape", [(512, 512), (300, 200), (224, 224), (100, 150)])
def test_resize_matches_pillow_bilinear(shape: tuple[int, int]) -> None:
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(dicom_studies.resize_bilinear_antialias(img, 224), ref, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits_stored": 7}, "bits_stored"),
        ({"bits_stored": 17}, "bits_stored"),
        ({"photometric": "RGB"}, "photometric"),
        ({"modality": "CT"}, "modality"),
        ({"transfer_syntax": "JPEGBaseline8Bit"}, "transfer syntax"),
        ({"rescale_slope": 0.0}, "rescale_slope"),
    ],
)
def test_invalid_arguments_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dicom_studies.phantom_dataset(seed=0, positive=False, rows=32, **kwargs)


def test_reference_preprocess_uses_voi_lut_sequence_without_window() -> None:
    from pydicom.dataset import Dataset

    ds = dicom_studies.phantom_dataset(seed=8, positive=False, rows=64, bits_stored=8, window=False)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = list(range(255, -1, -1))  # an inverting table
    ds.VOILUTSequence = [item]
    x = dicom_studies.reference_preprocess(ds, 64)[0, 0]
    np.testing.assert_allclose(x, 1.0 - ds.pixel_array / 255.0, atol=1e-6)
