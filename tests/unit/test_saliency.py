"""Saliency maps: the served CNN's class activation map as a DICOM Segmentation and a PNG.

Real parts only: the served ``cxr-pneumonia`` graph computes the maps, the real RG1 chest CR
and phantom studies (``training.dicom_studies``) are the sources, highdicom and dcmtk read the
objects back, Pillow decodes the PNG.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import SegmentationStorage, generate_uid
from scipy import ndimage

from app.encoders.dicom_sr import build_sr, device_uid, sr_bytes
from app.encoders.saliency import (
    OVERLAY_ALPHA,
    map_fractions,
    overlay_png,
    resample_map,
    saliency_map,
    sr_reference,
)
from app.errors import DicomMalformedError, InferenceFailedError, StudyMismatchError
from app.inference.registry import ServedVersion, load_version
from app.inference.spec import load_spec
from app.postprocess.classification import classify
from training import cxr_cam, phantoms
from training.dicom_studies import reference_preprocess, write_phantom_study

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "cxr-pneumonia"
CLASS_ACTIVATION = ("130402", "DCM")
#: 8-bit fractional storage: a stored value is within half a step of the map.
STEP = 1.0 / 255.0


@pytest.fixture(scope="module")
def demo() -> ServedVersion:
    spec = load_spec(MODEL_DIR)
    return load_version(spec, MODEL_DIR, spec.served_versions()[-1])


@pytest.fixture(scope="module")
def session(demo: ServedVersion) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    path = MODEL_DIR / demo.version / "model.onnx"
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture
def rg1() -> Dataset:
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert path is not None, "pydicom-data is not installed"
    return pydicom.dcmread(path)


def model_outputs(session: ort.InferenceSession, x: np.ndarray) -> dict[str, np.ndarray]:
    names = ["probabilities", "ood_score", "cam"]
    return dict(zip(names, session.run(names, {"image": np.asarray(x, np.float32)}), strict=True))


def round_trip(seg: Dataset) -> hd.seg.Segmentation:
    """Part 10 bytes and back: what a PACS stores is what is checked."""
    return hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(sr_bytes(seg))))


def referenced_instances(seg: Dataset) -> set[str]:
    refs = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame.DerivationImageSequence:
            refs |= {str(s.ReferencedSOPInstanceUID) for s in derivation.SourceImageSequence}
    return refs


def test_rg1_map_reads_back_with_highdicom_in_the_source_geometry(
    rg1: Dataset, demo: ServedVersion, session: ort.InferenceSession
) -> None:
    cam = model_outputs(session, reference_preprocess(rg1))["cam"]
    seg = round_trip(saliency_map(rg1, cam[0], demo, series_number=991, software_version="0.1.0"))

    assert seg.SOPClassUID == SegmentationStorage
    assert (seg.Rows, seg.Columns) == (rg1.Rows, rg1.Columns) == (1955, 1841)
    assert seg.NumberOfFrames == 1
    assert seg.StudyInstanceUID == rg1.StudyInstanceUID
    assert seg.PatientID == rg1.PatientID
    assert seg.SeriesInstanceUID != rg1.SeriesInstanceUID
    assert seg.SeriesNumber == 991
    assert referenced_instances(seg) == {str(rg1.SOPInstanceUID)}
    # a CR has no Frame of Reference: the map is registered pixel for pixel through its reference
    assert "FrameOfReferenceUID" not in rg1
    assert "FrameOfReferenceUID" not in seg
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert derivation.SpatialLocationsPreserved == "YES"
    fractions = map_fractions(seg, str(rg1.SOPInstanceUID))
    assert fractions.shape == (1955, 1841)
    assert fractions.min() >= 0.0
    assert fractions.max() == pytest.approx(1.0)


def test_rg1_map_is_marked_as_unverified_ai_output_of_the_model_version(
    rg1: Dataset, demo: ServedVersion, session: ort.InferenceSession
) -> None:
    cam = model_outputs(session, reference_preprocess(rg1))["cam"]
    seg = round_trip(saliency_map(rg1, cam[0], demo, series_number=991, software_version="0.1.0"))

    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.ContentLabel == "AI_SALIENCY"
    for text in (seg.SeriesDescription, seg.ContentDescription):
        assert "UNVERIFIED" in text
        assert "NOT FOR CLINICAL USE" in text
    (segment,) = seg.SegmentSequence
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == CLASS_ACTIVATION
    assert "not a probability" in segment.SegmentDescription
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == demo.spec.name
    equipment = [e for e in seg.ContributingEquipmentSequence if "DeviceUID" in e]
    assert [e.DeviceUID for e in equipment] == [device_uid(demo)]
    assert demo.sha256 in equipment[0].ContributionDescription
    assert "PixelData" not in rg1 or seg.PixelData != rg1.PixelData


def test_map_is_the_models_grid_resampled_half_pixel_centred_to_the_source(
    demo: ServedVersion, session: ort.InferenceSession
) -> None:
    """Checked against an independent resampler (torch, align_corners=False) on a non-square
    phantom: a shifted or transposed map would differ by far more than the 8-bit step."""
    ds = write_phantom_study(None, seed=6_200_001, positive=True, rows=300, columns=240, modality="DX")
    cam = model_outputs(session, reference_preprocess(ds))["cam"]
    seg = round_trip(saliency_map(ds, cam[0], demo, series_number=991, software_version="0.1.0"))

    assert (seg.Rows, seg.Columns) == (300, 240)
    expected = cxr_cam.upsample(cam, 300, 240)[0]
    expected /= expected.max()
    got = map_fractions(seg, str(ds.SOPInstanceUID))
    np.testing.assert_allclose(got, expected, rtol=0, atol=STEP / 2 + 1e-4)
    np.testing.assert_allclose(resample_map(cam[0], 300, 240), expected, rtol=0, atol=1e-4)


def test_map_peak_points_at_the_consolidation_of_most_positive_phantoms(
    demo: ServedVersion, session: ort.InferenceSession
) -> None:
    """The interpretability check (the pointing game): fresh positive phantoms (seeds no split
    used), written as DICOM at a size and aspect the model never saw and preprocessed as the
    service does. The map read back from the Segmentation peaks within 15 pixels of the model's
    224 x 224 input (Zhang et al., ECCV 2016) of the generator's own lesion mask more often than
    not, and far more often than a random point would."""
    rows, columns = 384, 320
    seeds = [6_300_000 + i for i in range(12)]
    hits, chance = [], []
    for seed in seeds:
        ds = write_phantom_study(None, seed=seed, positive=True, rows=rows, columns=columns, photometric="MONOCHROME1")
        out = model_outputs(session, reference_preprocess(ds))
        seg = round_trip(saliency_map(ds, out["cam"][0], demo, series_number=991, software_version="0.1.0"))
        fractions = map_fractions(seg, str(ds.SOPInstanceUID))
        lesion = phantoms.generate_with_mask(seed, True, rows, columns).lesion_mask >= 0.5
        # distance to the lesion in the model's input pixels (the image was stretched to 224 x 224)
        distance = ndimage.distance_transform_edt(~lesion, sampling=(224 / rows, 224 / columns))
        row, column = np.unravel_index(int(np.argmax(fractions)), fractions.shape)
        hits.append(bool(distance[row, column] <= cxr_cam.TOLERANCE_PX))
        chance.append(float(np.mean(distance <= cxr_cam.TOLERANCE_PX)))
    assert sum(hits) > len(seeds) / 2, hits
    assert np.mean(hits) > 2 * np.mean(chance), (hits, chance)


def test_dcmdump_reads_the_map_and_dsrdump_shows_the_sr_reference_to_it(
    tmp_path: Path, rg1: Dataset, demo: ServedVersion, session: ort.InferenceSession
) -> None:
    out = model_outputs(session, reference_preprocess(rg1))
    seg = saliency_map(rg1, out["cam"][0], demo, series_number=991, software_version="0.1.0")
    map_path = tmp_path / "map.dcm"
    map_path.write_bytes(sr_bytes(seg))
    dump = subprocess.run(["dcmdump", "-q", str(map_path)], capture_output=True, text=True, check=True).stdout
    assert "SegmentationStorage" in dump or "Segmentation Storage" in dump
    assert "FRACTIONAL" in dump
    assert str(rg1.SOPInstanceUID) in dump

    classification = classify(demo.spec, [float(p) for p in out["probabilities"][0]])
    sr = build_sr(
        [rg1],
        demo,
        classification,
        request_id="req-sal-1",
        software_version="0.1.0",
        extra_items=[sr_reference(seg)],
        extra_evidence=[seg],
    )
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(sr_bytes(sr))
    text = subprocess.run(["dsrdump", "+Pl", str(sr_path)], capture_output=True, text=True, check=True).stdout
    assert 'IMAGE:(,,"Referenced Segment")=(SG image,,1)' in text  # Segmentation, segment 1
    with_uids = subprocess.run(
        ["dsrdump", "+Pl", "+Pu", str(sr_path)], capture_output=True, text=True, check=True
    ).stdout
    assert str(seg.SOPInstanceUID) in with_uids
    read = pydicom.dcmread(sr_path)
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in read.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert evidence == {str(rg1.SOPInstanceUID), str(seg.SOPInstanceUID)}
    group = hd.sr.Comprehensive3DSR.from_dataset(read).content.get_image_measurement_groups()[0]
    (ref,) = [
        i
        for i in group[0].ContentSequence
        if i.ValueType == "IMAGE" and i.ConceptNameCodeSequence[0].CodeValue == "121191"
    ]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSegmentNumber == 1


def test_sr_refuses_evidence_from_another_study(rg1: Dataset, demo: ServedVersion) -> None:
    other = write_phantom_study(None, seed=6_200_002, positive=False, rows=64, study_uid=generate_uid())
    seg = saliency_map(other, np.ones((7, 7), np.float32), demo, series_number=991, software_version="0.1.0")
    classification = classify(demo.spec, [0.9, 0.1])
    with pytest.raises(StudyMismatchError):
        build_sr([rg1], demo, classification, request_id="r", software_version="0.1.0", extra_evidence=[seg])


def test_png_overlay_decodes_at_the_preprocessed_size_and_leaves_zero_activation_grey(
    demo: ServedVersion, session: ort.InferenceSession
) -> None:
    ds = write_phantom_study(None, seed=6_200_003, positive=True, rows=256)
    x = reference_preprocess(ds)
    cam = model_outputs(session, x)["cam"][0]
    image = Image.open(io.BytesIO(overlay_png(x, cam)))
    assert image.format == "PNG"
    assert image.size == (224, 224)
    assert image.mode == "RGB"
    rgb = np.asarray(image, dtype=np.float64)
    grey = 255.0 * x[0, 0]
    weight = resample_map(cam, 224, 224)
    cold = weight == 0.0
    if cold.any():
        np.testing.assert_allclose(rgb[cold], np.repeat(grey[cold][:, None], 3, axis=1), atol=0.51)
    row, column = np.unravel_index(int(np.argmax(weight)), weight.shape)
    assert np.abs(rgb[row, column] - grey[row, column]).max() > 0.25 * 255 * OVERLAY_ALPHA

    flat = Image.open(io.BytesIO(overlay_png(x, np.zeros((7, 7), np.float32))))
    np.testing.assert_allclose(np.asarray(flat, np.float64)[..., 1], grey, atol=0.51)


def test_a_map_without_activation_is_all_zero_and_still_a_valid_segmentation(demo: ServedVersion) -> None:
    ds = write_phantom_study(None, seed=6_200_004, positive=False, rows=96)
    seg = round_trip(saliency_map(ds, np.zeros((7, 7), np.float32), demo, series_number=5, software_version="0"))
    assert seg.NumberOfFrames == 1
    assert not map_fractions(seg, str(ds.SOPInstanceUID)).any()


@pytest.mark.parametrize(
    ("cam", "message"),
    [
        (np.full((7, 7), np.nan, np.float32), "NaN"),
        (np.ones(49, np.float32), "2-D"),
        (np.ones((2, 7, 7), np.float32), "2-D"),
    ],
)
def test_a_broken_model_map_is_an_inference_failure(demo: ServedVersion, cam: np.ndarray, message: str) -> None:
    ds = write_phantom_study(None, seed=6_200_005, positive=False, rows=64)
    with pytest.raises(InferenceFailedError, match=message):
        saliency_map(ds, cam, demo, series_number=5, software_version="0")


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "Rows"])
def test_a_source_without_identity_or_size_is_refused(demo: ServedVersion, keyword: str) -> None:
    ds: Any = write_phantom_study(None, seed=6_200_006, positive=False, rows=64)
    delattr(ds, keyword)
    with pytest.raises(DicomMalformedError, match=keyword):
        saliency_map(ds, np.ones((7, 7), np.float32), demo, series_number=5, software_version="0")
