"""Pixel preprocessing (app.preprocess.pixels): each DICOM transform on its own, and to_tensor
held to the training reference (training.dicom_studies.reference_preprocess) on real files and
generated phantoms in every transfer syntax, bit depth, photometric interpretation and VOI kind."""

from __future__ import annotations

import contextlib
import io
import struct
import tomllib
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.pixels.processing import apply_modality_lut as pydicom_modality_lut
from pydicom.uid import (
    UID,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from app.errors import DicomMalformedError, DicomUnsupportedError, ModelSpecError
from app.preprocess import pixels
from app.preprocess.pixels import (
    PixelRecipe,
    apply_modality_lut,
    apply_voi,
    decode,
    invert_monochrome1,
    mask_bits_stored,
    resize,
    to_tensor,
)
from tests.conftest import REPO_ROOT
from training.dicom_studies import phantom_dataset, reference_preprocess, resize_bilinear_antialias, study_bytes

MODEL_TOML = REPO_ROOT / "models" / "cxr-pneumonia" / "model.toml"
AGREEMENT = 1e-5  # the model was trained on reference_preprocess; float rounding only


def model_spec() -> dict[str, Any]:
    spec: dict[str, Any] = tomllib.loads(MODEL_TOML.read_text())
    return spec


def model_recipe() -> PixelRecipe:
    spec = model_spec()
    return PixelRecipe.from_preprocessing(spec["preprocessing"], spec["inputs"][0]["shape"])


def sample(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not installed"
    return pydicom.dcmread(io.BytesIO(Path(path).read_bytes()))


def twice(data: bytes) -> tuple[Dataset, Dataset]:
    """Two independent parses: one for medinfer, one for the reference (which caches pixels)."""
    return pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(data))


def encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def assert_agrees_with_reference(data: bytes, recipe: PixelRecipe | None = None) -> np.ndarray:
    recipe = recipe or model_recipe()
    ours_ds, theirs_ds = twice(data)
    ours = to_tensor(ours_ds, recipe)
    theirs = reference_preprocess(theirs_ds, recipe.size[0])[0]
    assert ours.shape == theirs.shape == (1, *recipe.size)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=AGREEMENT)
    assert 0.0 <= float(ours.min()) <= float(ours.max()) <= 1.0
    return ours


def takes_the_affine_shortcut(ds: Dataset, recipe: PixelRecipe) -> bool:
    return pixels._affine_display_map(mask_bits_stored(decode(ds), ds), ds, recipe) is not None


@contextlib.contextmanager
def pydicom_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record (instead of raising) the UserWarnings pydicom emits on damaged data; each must be
    one of pydicom's."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for w in caught:
        assert issubclass(w.category, UserWarning), w
        assert "pydicom" in Path(w.filename).parts, w


# ------------------------------------------------------------------------------- the recipe


def test_recipe_reads_the_model_preprocessing() -> None:
    recipe = model_recipe()
    assert recipe == PixelRecipe(
        size=(224, 224),
        channels=1,
        modality_lut=True,
        voi=True,
        voi_lut_functions=frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"}),
        invert_monochrome1=True,
    )


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"resize_method": "nearest"}, "resize_method"),
        ({"keep_aspect_ratio": True}, "keep_aspect_ratio"),
        ({"normalisation": "imagenet"}, "normalisation"),
        ({"input_range": [-1.0, 1.0]}, "input_range"),
        ({"channels": 2}, "channels"),
        ({"channels": 3}, "channels"),  # the input declares 1
        ({"layout": "NHWC"}, "layout"),
        ({"window_selection": "last"}, "window_selection"),
        ({"voi_lut_functions": ["GAMMA"]}, "voi_lut_functions"),
        ({"voi_lut_functions": "LINEAR"}, "voi_lut_functions"),
        ({"modality_lut": "maybe"}, "modality_lut"),
        ({"windowing": "histogram"}, "windowing"),
        ({"invert_monochrome1": "yes"}, "invert_monochrome1"),
        ({"resize": 256}, "resize"),  # the input declares 224
        ({"resize": [224]}, "resize"),
        ({"resize": 0}, "resize"),
        ({"layout": ["NCHW"]}, "layout"),
        ({"input_range": ["0", 1]}, "input_range"),
    ],
)
def test_recipe_refuses_what_it_does_not_implement(change: dict[str, Any], key: str) -> None:
    spec = model_spec()
    with pytest.raises(ModelSpecError, match=rf"preprocessing\.{key}"):
        PixelRecipe.from_preprocessing({**spec["preprocessing"], **change}, spec["inputs"][0]["shape"])


def test_recipe_needs_an_nchw_input_shape() -> None:
    with pytest.raises(ModelSpecError, match="NCHW"):
        PixelRecipe.from_preprocessing(model_spec()["preprocessing"], [-1, 224, 224])


def test_recipe_takes_dynamic_dimensions_from_the_preprocessing() -> None:
    recipe = PixelRecipe.from_preprocessing({"resize": [128, 96], "channels": 3}, [-1, -1, -1, -1])
    assert (recipe.size, recipe.channels) == ((128, 96), 3)
    assert PixelRecipe.from_preprocessing({}, [1, 1, 64, 32]).size == (64, 32)


# --------------------------------------------------------------------- agreement with training


PHANTOM_SYNTAXES = ["ExplicitVRLittleEndian", "RLELossless", "JPEG2000Lossless", "JPEGLSLossless"]


@pytest.mark.parametrize("syntax", PHANTOM_SYNTAXES)
@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("window", [True, False], ids=["window", "minmax"])
def test_phantoms_agree_with_the_training_reference(syntax: str, bits: int, photometric: str, window: bool) -> None:
    data = study_bytes(
        seed=bits,
        positive=photometric == "MONOCHROME1",
        rows=120,
        columns=90,
        bits_stored=bits,
        photometric=photometric,
        transfer_syntax=syntax,
        window=window,
        rescale_slope=1.5 if window else 1.0,
        rescale_intercept=-100.0 if window else 0.0,
    )
    assert_agrees_with_reference(data)


def test_a_large_phantom_is_shrunk_like_the_reference() -> None:
    assert_agrees_with_reference(study_bytes(seed=3, positive=True, rows=1024, columns=800, bits_stored=12))


@pytest.mark.parametrize(
    "name",
    [
        "RG1_UNCR.dcm",
        "RG1_J2KR.dcm",
        "RG1_J2KI.dcm",
        "CT_small.dcm",  # rescale slope/intercept, signed
        "MR_small.dcm",  # signed, window that clips
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG-LL.dcm",
        "JPGExtended.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "JPEG2000.dcm",
        "mlut_18.dcm",  # Modality LUT Sequence
        "vlut_04.dcm",  # VOI LUT Sequence
        "image_dfl.dcm",  # deflated
    ],
)
def test_real_files_agree_with_the_training_reference(name: str) -> None:
    path = get_testdata_file(name, download=False)
    assert path is not None
    assert_agrees_with_reference(Path(path).read_bytes())


def test_real_chest_cr_is_the_same_image_in_every_encoding() -> None:
    tensors = [to_tensor(sample(name), model_recipe()) for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")]
    np.testing.assert_array_equal(tensors[0], tensors[1])
    lossy = to_tensor(sample("RG1_J2KI.dcm"), model_recipe())
    assert float(np.abs(lossy - tensors[0]).max()) < 0.02


def test_real_chest_cr_takes_the_affine_shortcut() -> None:
    """RG1's window (15000 / 30000) clips none of its values: every step is affine, so the stored
    values are resampled first; the result still agrees with the reference above."""
    assert takes_the_affine_shortcut(sample("RG1_UNCR.dcm"), model_recipe())


def _phantom(**kwargs: Any) -> Dataset:
    kwargs.setdefault("seed", 5)
    kwargs.setdefault("positive", True)
    kwargs.setdefault("rows", 96)
    kwargs.setdefault("bits_stored", 12)
    return phantom_dataset(**kwargs)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_each_voi_lut_function_agrees_with_the_reference(function: str, photometric: str) -> None:
    ds = _phantom(photometric=photometric, rescale_slope=2.0, rescale_intercept=-1024.0)
    ds.WindowCenter, ds.WindowWidth = [1500.0, 40.0], [3000.0, 400.0]  # the first pair is used
    ds.VOILUTFunction = function
    assert_agrees_with_reference(encoded(ds))


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEGLSLossless])
def test_a_window_that_clips_takes_the_full_resolution_path_and_agrees(syntax: str | None) -> None:
    ds = _phantom(photometric="MONOCHROME1")
    ds.WindowCenter, ds.WindowWidth = 1800, 900
    if syntax:
        ds.compress(syntax, generate_instance_uid=False)
    assert not takes_the_affine_shortcut(ds, model_recipe())
    assert_agrees_with_reference(encoded(ds))


def test_voi_lut_sequence_agrees_with_the_reference() -> None:
    ds = _phantom(bits_stored=8, window=False)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [200, 20, 12])
    item.add_new("LUTData", "US", [int(4095 * (i / 199) ** 2) for i in range(200)])  # gamma-like, clamped ends
    ds.VOILUTSequence = [item]
    assert not takes_the_affine_shortcut(ds, model_recipe())
    assert_agrees_with_reference(encoded(ds))


def test_modality_lut_sequence_agrees_with_the_reference() -> None:
    ds = _phantom(bits_stored=10, window=False)
    del ds.RescaleSlope, ds.RescaleIntercept
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [1024, 0, 16])
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", [(i * 37) % 4096 for i in range(1024)])  # not monotonic: min-max over its output
    ds.ModalityLUTSequence = [item]
    assert_agrees_with_reference(encoded(ds))


def test_a_flat_image_is_all_zero_or_all_one() -> None:
    ds = _phantom(window=False, photometric="MONOCHROME2")
    ds.PixelData = bytes(len(ds.PixelData))
    assert float(assert_agrees_with_reference(encoded(ds)).max()) == 0.0
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert float(assert_agrees_with_reference(encoded(ds)).min()) == 1.0


def test_three_channel_recipe_repeats_the_grey_channel() -> None:
    recipe = PixelRecipe(size=(64, 48), channels=3)
    x = to_tensor(sample("RG1_UNCR.dcm"), recipe)
    assert x.shape == (3, 64, 48)
    np.testing.assert_array_equal(x[0], x[2])


def test_recipe_without_voi_uses_min_max_even_with_a_window() -> None:
    ds = _phantom()
    recipe = PixelRecipe(size=(32, 32), voi=False)
    x = to_tensor(ds, recipe)
    assert float(x.min()) == pytest.approx(0.0, abs=0.05)
    assert float(x.max()) == pytest.approx(1.0, abs=0.05)


# ------------------------------------------------------------------------ single transforms


def test_decode_gives_stored_values_for_every_syntax() -> None:
    for name in ("RG1_UNCR.dcm", "MR_small_bigendian.dcm", "emri_small_RLE.dcm", "JPEG-LL.dcm"):
        ds = sample(name)
        np.testing.assert_array_equal(mask_bits_stored(decode(ds), ds), ds.pixel_array)


def test_decode_of_uncompressed_monochrome_is_a_read_only_view() -> None:
    ds = sample("RG1_UNCR.dcm")
    arr = decode(ds)
    assert not arr.flags.writeable
    assert not arr.flags.owndata
    to_tensor(ds, model_recipe())
    assert ds._pixel_array is None  # decode caches nothing on the dataset


def test_decode_returns_colour_as_rgb() -> None:
    arr = decode(sample("SC_rgb_jpeg_dcmtk.dcm"))
    assert arr.shape == (100, 100, 3)


@pytest.mark.parametrize("syntax", [HTJ2KLossless, JPEGLosslessSV1])
def test_decode_routes_other_syntaxes_to_their_plugins(syntax: str) -> None:
    """HTJ2K: openjpeg reads Part 1 codestreams under the HTJ2K syntaxes (no HT-coded sample is
    available here); .70 through libjpeg."""
    source = "MR_small_jp2klossless.dcm" if syntax == HTJ2KLossless else "JPGLosslessP14SV1_1s_1f_8b.dcm"
    ds = sample(source)
    expected = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    np.testing.assert_array_equal(mask_bits_stored(decode(ds), ds), expected)


def test_decode_of_an_unknown_syntax_is_unsupported() -> None:
    ds = sample("RG1_UNCR.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no pixel decoder
    with pytest.raises(DicomUnsupportedError):
        decode(ds)


def _first_frame(ds: Dataset) -> bytes:
    return next(generate_fragmented_frames(ds.PixelData, number_of_frames=1))[0]


def test_decode_of_a_damaged_codestream_is_malformed() -> None:
    ds = pydicom.dcmread(io.BytesIO(study_bytes(seed=1, positive=True, rows=64, transfer_syntax="JPEG2000Lossless")))
    frame = _first_frame(ds)
    at = frame.index(b"\xff\x90")  # the tile-part header (SOT) overwritten
    ds.PixelData = encapsulate([frame[:at] + bytes(12) + frame[at + 12 :]])
    with pytest.raises(DicomMalformedError, match="could not be decoded"):
        decode(ds)


@pytest.mark.parametrize(
    ("syntax", "marker", "offset"), [(JPEGLSLossless, b"\xff\xf7", 5), (JPEG2000Lossless, b"\xff\x51", 8)]
)
def test_a_codestream_declaring_a_larger_image_is_refused_before_decoding(
    syntax: str, marker: bytes, offset: int
) -> None:
    """A few hundred bytes whose JPEG-LS header declares 40000 x 40000 made charls allocate 6 GB
    and run for 90 s; the codestream must declare what Rows and Columns do."""
    ds = pydicom.dcmread(io.BytesIO(study_bytes(seed=1, positive=True, rows=32, transfer_syntax=syntax)))
    data = ds.PixelData
    at = data.index(marker) + offset
    width = 2 if syntax == JPEGLSLossless else 4
    size = (40000).to_bytes(width, "big")
    ds.PixelData = data[:at] + size + size + data[at + 2 * width :]
    with pytest.raises(DicomMalformedError, match="another size"):
        decode(ds)


def test_a_panicking_rle_decoder_is_a_malformed_image() -> None:
    """pylibjpeg-rle (Rust) panics on a segment cut short (found by the mutation test); pyo3
    raises that as a BaseException, which pydicom does not wrap."""
    ds = pydicom.dcmread(io.BytesIO(study_bytes(seed=1, positive=True, rows=32, transfer_syntax="RLELossless")))
    frame = _first_frame(ds)
    segments, *offsets = struct.unpack_from("<16I", frame)
    at = offsets[segments - 1] + (len(frame) - offsets[segments - 1]) * 3 // 10
    ds.PixelData = encapsulate([frame[:at] + frame[at + 5 :]])
    with pydicom_warnings(), pytest.raises(DicomMalformedError, match="the decoder panicked"):
        decode(ds)


def test_mask_bits_stored_clears_unsigned_high_bits() -> None:
    ds = Dataset()
    ds.BitsStored = 12
    clean = np.array([0, 4095, 17], dtype=np.uint16)
    assert mask_bits_stored(clean, ds) is clean
    dirty = np.array([0xF000 | 5, 4095, 0x8000], dtype=np.uint16)
    np.testing.assert_array_equal(mask_bits_stored(dirty, ds), [5, 4095, 0])
    assert dirty[0] == 0xF005  # the input is untouched


def test_mask_bits_stored_sign_extends_signed_values() -> None:
    ds = Dataset()
    ds.BitsStored = 12
    clean = np.array([-2048, 2047, 0], dtype=np.int16)
    assert mask_bits_stored(clean, ds) is clean
    raw = np.array([0x0FFF, 0x0800, 0x07FF, 0x7001], dtype=np.uint16).view(np.int16)
    np.testing.assert_array_equal(mask_bits_stored(raw, ds), [-1, -2048, 2047, 1])


def test_apply_modality_lut_rescales_in_float32() -> None:
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
    out = apply_modality_lut(np.array([[0, 2048]], dtype=np.uint16), ds)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[-1024.0, 0.0]])


def test_apply_modality_lut_uses_the_sequence_like_pydicom() -> None:
    ds = sample("mlut_18.dcm")
    arr = ds.pixel_array
    np.testing.assert_array_equal(apply_modality_lut(arr, ds), pydicom_modality_lut(arr, ds).astype(np.float32))


def test_apply_modality_lut_without_attributes_is_identity() -> None:
    out = apply_modality_lut(np.array([1, 2], dtype=np.uint8), Dataset())
    np.testing.assert_array_equal(out, [1.0, 2.0])


def _window_ds(center: float, width: float, function: str | None = None) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = center, width
    if function:
        ds.VOILUTFunction = function
    return ds


def test_linear_window_follows_the_standard_formula() -> None:
    # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; c = 2048, w = 4096
    x = np.array([-10, 0, 2047.5, 3071.25, 4095, 5000], dtype=np.float32)
    y = apply_voi(x, _window_ds(2048, 4096), model_recipe())
    np.testing.assert_allclose(y, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)


def test_linear_window_of_width_one_is_a_threshold() -> None:
    y = apply_voi(np.array([9, 9.5, 10, 11], dtype=np.float32), _window_ds(10, 1), model_recipe())
    np.testing.assert_array_equal(y, [0.0, 0.0, 1.0, 1.0])


def test_linear_exact_and_sigmoid_windows() -> None:
    x = np.array([0, 50, 100], dtype=np.float32)
    np.testing.assert_allclose(apply_voi(x, _window_ds(50, 100, "LINEAR_EXACT"), model_recipe()), [0, 0.5, 1])
    sigmoid = apply_voi(x, _window_ds(50, 100, "SIGMOID"), model_recipe())
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-4 * (x - 50) / 100)), atol=1e-6)
    extreme = apply_voi(np.array([-1e30, 1e30], dtype=np.float32), _window_ds(0, 1, "SIGMOID"), model_recipe())
    np.testing.assert_array_equal(extreme, [0.0, 1.0])  # no overflow warning either


@pytest.mark.parametrize(("width", "function"), [(0.5, "LINEAR"), (0, "LINEAR_EXACT"), (-1, "SIGMOID")])
def test_invalid_window_width_is_malformed(width: float, function: str) -> None:
    with pytest.raises(DicomMalformedError, match="WindowWidth"):
        apply_voi(np.zeros(3, dtype=np.float32), _window_ds(0, width, function), model_recipe())


def test_voi_lut_function_the_model_does_not_list_is_unsupported() -> None:
    recipe = PixelRecipe(size=(8, 8), voi_lut_functions=frozenset({"LINEAR"}))
    with pytest.raises(DicomUnsupportedError, match="VOILUTFunction must be one of LINEAR"):
        apply_voi(np.zeros(3, dtype=np.float32), _window_ds(0, 10, "SIGMOID"), recipe)
    with pytest.raises(DicomUnsupportedError, match="VOILUTFunction"):
        apply_voi(np.zeros(3, dtype=np.float32), _window_ds(0, 10, "GAMMA"), model_recipe())


def test_voi_lut_sequence_lookup_and_its_damage() -> None:
    ds = Dataset()
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]
    item.LUTData = [0, 51, 102, 255]
    ds.VOILUTSequence = [item]
    y = apply_voi(np.array([0, 10, 11, 12.4, 13, 99], dtype=np.float32), ds, model_recipe())
    np.testing.assert_allclose(y, [0, 0, 0.2, 0.4, 1, 1])
    item.LUTDescriptor = [4, 10, 0]
    with pytest.raises(DicomMalformedError, match="bit depth"):
        apply_voi(np.zeros(2, dtype=np.float32), ds, model_recipe())


def test_min_max_uses_the_given_range() -> None:
    y = apply_voi(np.array([2, 4], dtype=np.float32), Dataset(), model_recipe(), value_range=(0.0, 8.0))
    np.testing.assert_allclose(y, [0.25, 0.5])


def test_invert_monochrome1_only_inverts_monochrome1() -> None:
    x = np.array([0.0, 0.25, 1.0], dtype=np.float32)
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(invert_monochrome1(x, ds), [1.0, 0.75, 0.0])
    np.testing.assert_array_equal(x, [0.0, 0.25, 1.0])
    ds.PhotometricInterpretation = "MONOCHROME2"
    assert invert_monochrome1(x, ds) is x


@pytest.mark.parametrize(
    ("shape", "size"), [((1955, 1841), (224, 224)), ((100, 150), (224, 224)), ((64, 64), (17, 90))]
)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_resize_matches_the_training_resampler(shape: tuple[int, int], size: tuple[int, int], dtype: Any) -> None:
    rng = np.random.default_rng(1)
    img = (rng.random(shape) * (200 if dtype in (np.uint8, np.int16) else 60000)).astype(dtype)
    ours = resize(img, size)
    assert ours.dtype == np.float32
    assert ours.shape == size
    reference = resize_bilinear_antialias(img.astype(np.float64), *size)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6 * float(np.abs(reference).max()))


def test_resize_to_the_same_size_is_a_copy() -> None:
    img = np.ones((4, 5), dtype=np.uint16)
    out = resize(img, (4, 5))
    assert out.dtype == np.float32
    assert not np.shares_memory(out, img)


# ------------------------------------------------------------------------- refusals and costs


def test_colour_and_multi_frame_images_are_not_taken_by_a_grey_recipe() -> None:
    with pytest.raises(DicomUnsupportedError, match="PhotometricInterpretation"):
        to_tensor(sample("SC_rgb_jpeg_dcmtk.dcm"), model_recipe())
    with pytest.raises(DicomUnsupportedError, match="NumberOfFrames"):
        to_tensor(sample("emri_small.dcm"), model_recipe())


def test_to_tensor_leaves_the_dataset_bytes_alone() -> None:
    ds = sample("RG1_UNCR.dcm")
    before = bytes(ds.PixelData)
    to_tensor(ds, model_recipe())
    assert ds.PixelData == before


@pytest.mark.parametrize("shortcut", [True, False], ids=["affine", "full-resolution"])
def test_preprocessing_a_radiograph_needs_no_float64_copy(shortcut: bool) -> None:
    """Peak numpy memory of to_tensor on RG1 (1955 x 1841): one float32 copy at most (7.2 MB per
    float32 image; a float64 copy alone would be 14.4 MB)."""
    ds = sample("RG1_UNCR.dcm")
    if not shortcut:
        ds.WindowCenter, ds.WindowWidth = 9000, 6000  # clips: full resolution path
    recipe = model_recipe()
    assert takes_the_affine_shortcut(ds, recipe) is shortcut
    float32_image = 1955 * 1841 * 4
    tracemalloc.start()
    try:
        to_tensor(ds, recipe)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (1.3 if not shortcut else 0.3) * float32_image
