"""DICOM pixel data -> a model's input tensor, one pure function per transform of the standard.

The order is the grayscale pipeline of PS3.4 N.2 as ``model.toml`` ``[preprocessing]`` states it:
decode the stored values (:func:`decode`), keep only the stored bits (:func:`mask_bits_stored`),
the Modality LUT (:func:`apply_modality_lut`), the VOI LUT or window into [0, 1]
(:func:`apply_voi`), MONOCHROME1 inversion (:func:`invert_monochrome1`), then the model's own
resampling (:func:`resize`). :func:`to_tensor` composes them. The model was trained with
``training.dicom_studies.reference_preprocess``; the tests hold :func:`to_tensor` to it.

Functions never modify their input (decoded arrays may be read-only views onto the dataset's
bytes) and compute in float32: a 1955 x 1841 radiograph costs one float32 copy, not float64 ones.
Failures are domain errors: DicomMalformedError for damaged data, DicomUnsupportedError for an
encoding or a pixel layout this service (or this model) does not take, ModelSpecError for a
recipe ``model.toml`` should not have declared.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut as _pydicom_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from app.errors import DicomMalformedError, DicomUnsupportedError, ModelSpecError

__all__ = [
    "VOI_LUT_FUNCTIONS",
    "PixelRecipe",
    "apply_modality_lut",
    "apply_voi",
    "decode",
    "invert_monochrome1",
    "mask_bits_stored",
    "resize",
    "to_tensor",
]

Float32Array = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.floating[Any]]

VOI_LUT_FUNCTIONS: frozenset[str] = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})
"""The VOI LUT Functions of PS3.3 C.11.2.1.3 that :func:`apply_voi` implements."""

_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_MAX_SIZE = 8192
# Clipping a value that the fast path computes within this distance of [0, 1] changes nothing
# the model can see; it only absorbs float rounding of the composed map at the image's extremes.
_CLIP_SLACK = 1e-9
# What pydicom and its decoding plugins raise on damaged pixel data or LUTs (pydicom wraps
# plugin failures in RuntimeError; NotImplementedError is a RuntimeError), and pydicom's
# UserWarnings about damaged pixel data where warnings are errors.
_DECODE_FAILURES: tuple[type[Exception], ...] = (
    UserWarning,
    InvalidDicomError,
    BytesLengthException,
    EOFError,
    OSError,
    struct.error,
    ValueError,
    TypeError,
    AttributeError,
    LookupError,
    ArithmeticError,
    RuntimeError,
)


# -------------------------------------------------------------------------------- the recipe


@dataclass(frozen=True, slots=True)
class PixelRecipe:
    """How one model wants its pixels, from ``model.toml`` ``[preprocessing]``.

    ``size`` is (rows, columns) of the output; ``channels`` copies of the one grey channel are
    stacked (layout NCHW, so :func:`to_tensor` returns [channels, rows, columns]).
    """

    size: tuple[int, int]
    channels: int = 1
    modality_lut: bool = True
    voi: bool = True
    voi_lut_functions: frozenset[str] = VOI_LUT_FUNCTIONS
    invert_monochrome1: bool = True

    @classmethod
    def from_preprocessing(cls, preprocessing: Mapping[str, Any], input_shape: Sequence[int]) -> PixelRecipe:
        """Read the recipe keys; raise ModelSpecError naming the key for anything this module
        does not implement, so a model never serves with a recipe that is silently different.

        ``input_shape`` is the model input's shape ([batch, channels, rows, columns] for NCHW;
        -1 marks a dynamic dimension, taken from the recipe).
        """
        p = preprocessing
        _choice(p, "layout", {"NCHW"}, "NCHW")
        shape = list(input_shape)
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape):  # noqa: PLR2004 - NCHW
            raise ModelSpecError("the image input's shape must be [batch, channels, rows, columns] for layout NCHW")
        _, shape_channels, shape_rows, shape_columns = shape

        channels = p.get("channels", shape_channels)
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ModelSpecError("preprocessing.channels must be 1 or 3")
        if shape_channels > 0 and shape_channels != channels:
            raise ModelSpecError("preprocessing.channels differs from the input's channel dimension")

        size = _size(p.get("resize", [shape_rows, shape_columns]))
        for declared, wanted, axis in ((shape_rows, size[0], "rows"), (shape_columns, size[1], "columns")):
            if declared > 0 and declared != wanted:
                raise ModelSpecError(f"preprocessing.resize differs from the input's {axis} dimension")

        _choice(p, "resize_method", {"bilinear_antialias"}, "bilinear_antialias")
        if p.get("keep_aspect_ratio", False) is not False:
            raise ModelSpecError("preprocessing.keep_aspect_ratio must be false (padding is not implemented)")
        _choice(p, "normalisation", {"unit_range"}, "unit_range")
        input_range = p.get("input_range", [0.0, 1.0])
        if (
            not isinstance(input_range, list | tuple)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in input_range)
            or [float(v) for v in input_range] != [0.0, 1.0]
        ):
            raise ModelSpecError("preprocessing.input_range must be [0.0, 1.0]")
        _choice(p, "window_selection", {"first"}, "first")

        functions = p.get("voi_lut_functions", sorted(VOI_LUT_FUNCTIONS))
        if not isinstance(functions, list | tuple) or not all(isinstance(f, str) for f in functions):
            raise ModelSpecError("preprocessing.voi_lut_functions must be a list of strings")
        chosen = frozenset(f.strip().upper() for f in functions)
        if not chosen <= VOI_LUT_FUNCTIONS:
            raise ModelSpecError(
                f"preprocessing.voi_lut_functions may hold only {', '.join(sorted(VOI_LUT_FUNCTIONS))}"
            )

        invert = p.get("invert_monochrome1", True)
        if not isinstance(invert, bool):
            raise ModelSpecError("preprocessing.invert_monochrome1 must be true or false")
        return cls(
            size=size,
            channels=channels,
            modality_lut=_choice(p, "modality_lut", {"apply", "ignore"}, "apply") == "apply",
            voi=_choice(p, "windowing", {"voi_lut_or_minmax", "minmax"}, "voi_lut_or_minmax") == "voi_lut_or_minmax",
            voi_lut_functions=chosen,
            invert_monochrome1=invert,
        )


def _choice(p: Mapping[str, Any], key: str, allowed: set[str], default: str) -> str:
    value = p.get(key, default)
    if not isinstance(value, str) or value not in allowed:
        raise ModelSpecError(f"preprocessing.{key} must be one of {', '.join(sorted(allowed))}")
    return str(value)


def _size(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2  # noqa: PLR2004 - rows, columns
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_SIZE for v in value)
    ):
        raise ModelSpecError(f"preprocessing.resize must be a size (or [rows, columns]) between 1 and {_MAX_SIZE}")
    return int(value[0]), int(value[1])


# ------------------------------------------------------------------------------ the transforms


def decode(ds: Dataset) -> npt.NDArray[Any]:
    """Decode the Pixel Data into stored values (PS3.5 Section 8 and Annex A; PS3.3 C.7.6.3).

    pydicom decodes every transfer syntax of ``app.parsing.dicom.SUPPORTED_TRANSFER_SYNTAXES``
    (RLE itself; JPEG, JPEG-LS and JPEG 2000 through pylibjpeg, pyjpegls or Pillow). The unused
    high bits are left as encoded (:func:`mask_bits_stored` clears them), so that uncompressed
    monochrome data comes back as a read-only view of the dataset's bytes instead of a copy. The
    array may be in the dataset's byte order (big endian for Explicit VR Big Endian).

    Shape: (rows, columns), (rows, columns, samples), (frames, rows, columns) or
    (frames, rows, columns, samples). Colour data is returned as RGB.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        raise DicomMalformedError("TransferSyntaxUID is missing from the File Meta Information")
    try:
        decoder = get_decoder(UID(str(syntax)))
    except NotImplementedError:
        raise DicomUnsupportedError(f"transfer syntax {syntax} has no pixel decoder here") from None
    if not decoder.is_available:
        raise DicomUnsupportedError(f"transfer syntax {syntax} needs a decoding plugin that is not installed")
    _check_codestreams(ds, str(syntax))
    options: dict[str, Any] = {"correct_unused_bits": False}
    if _view_possible(ds, str(syntax)):
        options["view_only"] = True
    try:
        decoded: npt.NDArray[Any] = pixel_array(ds, **options)
    except _DECODE_FAILURES as exc:
        raise DicomMalformedError(f"the pixel data could not be decoded ({type(exc).__name__})") from None
    except BaseException as exc:
        if not _is_rust_panic(exc):
            raise
        raise DicomMalformedError("the pixel data could not be decoded (the decoder panicked)") from None
    return decoded


def _is_rust_panic(exc: BaseException) -> bool:
    """pylibjpeg-rle is written in Rust and panics on some damaged RLE segments; pyo3 turns a
    panic into ``pyo3_runtime.PanicException``, a BaseException (so that ``except Exception`` does
    not swallow it), which pydicom does not wrap. For us it is damaged pixel data, nothing more."""
    kind = type(exc)
    return kind.__name__ == "PanicException" and kind.__module__ == "pyo3_runtime"


def _check_codestreams(ds: Dataset, syntax: str) -> None:
    """Each frame's JPEG, JPEG-LS or JPEG 2000 header must declare the image the DICOM header
    declares (PS3.5 8.2: Rows, Columns and Samples per Pixel describe the decompressed frame).

    The decoders allocate what the codestream declares, not what the DICOM header does: a few
    hundred bytes declaring a 40000 x 40000 JPEG-LS image keep a worker busy for a minute and
    take gigabytes. ``read_instance`` has capped the DICOM header's size, so checking the
    codestreams against it caps the decoders too.

    Each frame must also be whole (:func:`_jpeg_complete`, :func:`_j2k_complete`): CharLS decodes
    a JPEG-LS frame cut short, and OpenJPEG a JPEG 2000 frame missing tiles, without an error,
    into an image that is partly invented.
    """
    reader = _CODESTREAM_READERS.get(syntax)
    if reader is None:
        return
    expected = (_int(ds, "Rows", 0), _int(ds, "Columns", 0), _int(ds, "SamplesPerPixel", 1))
    count = _int(ds, "NumberOfFrames", 1)
    offsets = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    try:
        # Split as pydicom's decoders split, so each header checked is one the decoder will read.
        frames = generate_fragmented_frames(
            ds.PixelData,
            number_of_frames=count,
            extended_offsets=offsets if offsets[0] and offsets[1] else None,
        )
        for fragments in itertools.islice(frames, count):
            frame = b"".join(fragments)
            if reader(frame) != expected:
                raise DicomMalformedError(
                    "a compressed frame's own header declares another size or sample count than "
                    "Rows, Columns and SamplesPerPixel"
                )
            _CODESTREAM_COMPLETE[reader](frame)
    except (ValueError, TypeError, struct.error, EOFError, OSError, IndexError, KeyError):
        raise DicomMalformedError("the encapsulated pixel data, or a frame header in it, is damaged") from None


def _jpeg_header(frame: bytes) -> tuple[int, int, int]:
    """(lines, samples per line, components) from the SOF marker segment (ITU-T T.81 B.2.2;
    JPEG-LS SOF55, ITU-T T.87 C.2.2)."""
    if frame[:2] != b"\xff\xd8":
        raise DicomMalformedError("a JPEG frame does not start with an SOI marker")
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:  # noqa: PLR2004
            raise DicomMalformedError("a JPEG frame has a damaged marker segment")
        marker = frame[pos + 1]
        if marker == 0xFF:  # noqa: PLR2004 - fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # noqa: PLR2004 - markers without a length
            pos += 2
            continue
        if marker in _JPEG_SOF_MARKERS:
            _, lines, columns, components = struct.unpack_from(">BHHB", frame, pos + 4)
            if lines == 0:
                raise DicomUnsupportedError("JPEG frames whose height is set by a DNL marker are not supported")
            return lines, columns, components
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            break
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    raise DicomMalformedError("a JPEG frame has no frame header")


def _j2k_header(frame: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from the SIZ marker segment (ITU-T T.800 A.5.1), also inside
    a JP2 wrapper, which some writers add though DICOM wants the bare codestream."""
    start = 0 if frame[:4] == _J2K_SOC_SIZ else -1
    if start < 0 and frame[:12] == _JP2_SIGNATURE:
        start = frame.find(_J2K_SOC_SIZ, 0, 1 << 16)
    if start < 0:
        raise DicomMalformedError("a JPEG 2000 frame does not start with SOC and SIZ markers")
    xsiz, ysiz, x_offset, y_offset = struct.unpack_from(">IIII", frame, start + 8)
    (components,) = struct.unpack_from(">H", frame, start + 40)
    return ysiz - y_offset, xsiz - x_offset, components


_EOI = b"\xff\xd9"  # JPEG EOI (T.81 B.1.1.3) and JPEG 2000 EOC (T.800 A.4.4) are the same bytes
# Fragments are padded to even length (PS3.5 A.4), with 0x00 or, by some writers, a 0xFF fill
# byte (T.81 B.1.1.2): a few of either may follow the EOI.
_TAIL = 18
_UNDECODABLE = "the pixel data could not be decoded: "


def _ends_with_eoi(frame: bytes) -> bool:
    return frame[-_TAIL:].rstrip(b"\0\xff").endswith(_EOI)


def _jpeg_complete(frame: bytes) -> None:
    """Compressed image data ends with EOI (ITU-T T.81 B.2.1; JPEG-LS, T.87 C.2.1)."""
    if not _ends_with_eoi(frame):
        raise DicomMalformedError(_UNDECODABLE + "a compressed frame does not end with an EOI marker: it is cut short")


_SOT = b"\xff\x90"
_MAX_TILES = 65535  # ITU-T T.800 A.4.2: tile indices are 16 bits
_MIN_TILE_PART = 14  # SOT marker segment (12 bytes) and SOD


def _j2k_complete(frame: bytes) -> None:
    """Every tile the SIZ marker's grid declares has a tile-part, each tile-part lies inside the
    frame, and the codestream ends with EOC (ITU-T T.800 A.4.2, A.4.4, A.5.1)."""
    start = frame.find(_J2K_SOC_SIZ, 0, 1 << 16)
    xsiz, ysiz, x_offset, y_offset, x_tile, y_tile, x_tile_offset, y_tile_offset = struct.unpack_from(
        ">8I", frame, start + 8
    )
    if not (x_tile and y_tile and x_tile_offset <= x_offset < xsiz and y_tile_offset <= y_offset < ysiz):
        raise DicomMalformedError(_UNDECODABLE + "a JPEG 2000 frame declares an impossible tile grid")
    tiles = math.ceil((xsiz - x_tile_offset) / x_tile) * math.ceil((ysiz - y_tile_offset) / y_tile)
    if tiles > _MAX_TILES:
        raise DicomMalformedError(_UNDECODABLE + "a JPEG 2000 frame declares more tiles than the standard allows")
    pos = start + 2
    while frame[pos : pos + 2] != _SOT:  # the main header's marker segments, up to the first SOT
        if len(frame) < pos + 4 or frame[pos] != 0xFF:  # noqa: PLR2004
            raise DicomMalformedError(_UNDECODABLE + "a JPEG 2000 frame's main header is damaged or cut short")
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    seen: set[int] = set()
    while frame[pos : pos + 2] == _SOT:
        tile, length = struct.unpack_from(">HI", frame, pos + 4)
        seen.add(tile)
        if length == 0:  # the last tile-part runs to EOC
            ended = _ends_with_eoi(frame)
            break
        if length < _MIN_TILE_PART:
            raise DicomMalformedError(_UNDECODABLE + "a JPEG 2000 tile-part is shorter than its own header")
        pos += length
    else:
        ended = frame[pos : pos + 2] == _EOI
    if not ended:
        raise DicomMalformedError(_UNDECODABLE + "a JPEG 2000 frame is cut short: a tile-part or EOC is missing")
    if len(seen) != tiles or max(seen, default=tiles) >= tiles:
        raise DicomMalformedError(_UNDECODABLE + "a JPEG 2000 frame is missing tiles that its SIZ marker declares")


_JPEG_SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_CODESTREAM_READERS: dict[str, Callable[[bytes], tuple[int, int, int]]] = {
    **dict.fromkeys(
        (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless),
        _jpeg_header,
    ),
    **dict.fromkeys((JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K), _j2k_header),
}
_CODESTREAM_COMPLETE: dict[Callable[[bytes], tuple[int, int, int]], Callable[[bytes], None]] = {
    _jpeg_header: _jpeg_complete,
    _j2k_header: _j2k_complete,
}


def _view_possible(ds: Dataset, syntax: str) -> bool:
    """pydicom can return a view (and logs a warning when asked for one it cannot give) only for
    uncompressed monochrome data that needs no unpacking or byte swapping."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    bits = ds.get("BitsAllocated")
    if photometric not in _MONOCHROME or not isinstance(bits, int) or bits < 8:  # noqa: PLR2004
        return False
    return not (bits == 8 and syntax == ExplicitVRBigEndian)  # noqa: PLR2004 - 8-bit OW is swapped pairwise


def mask_bits_stored(arr: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[Any]:
    """Keep only the Bits Stored of each value (PS3.3 C.7.6.3, Bits Stored / High Bit / Pixel
    Representation; PS3.5 8.1.1): clear the unused high bits of unsigned values, sign-extend
    signed ones from bit Bits Stored - 1. The unused bits may carry anything (overlays, in old
    files), so the standard says to ignore them.

    Returns ``arr`` itself when no value has a bit outside the stored ones (the usual case).
    """
    if arr.dtype.kind not in "ui":
        return arr
    width = arr.dtype.itemsize * 8
    stored = _int(ds, "BitsStored", width)
    if not 1 <= stored <= width:
        raise DicomMalformedError("BitsStored must be between 1 and BitsAllocated")
    if stored == width or arr.size == 0:
        return arr
    if arr.dtype.kind == "u":
        limit = (1 << stored) - 1
        if int(arr.max()) <= limit:
            return arr
        masked: npt.NDArray[Any] = np.bitwise_and(arr, np.array(limit, dtype=arr.dtype))
        return masked
    low, high = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
    if int(arr.min()) >= low and int(arr.max()) <= high:
        return arr
    shift = np.array(width - stored, dtype=arr.dtype)
    extended: npt.NDArray[Any] = np.right_shift(np.left_shift(arr, shift), shift)
    return extended


def apply_modality_lut(arr: npt.NDArray[Any], ds: Dataset) -> FloatArray:
    """Stored values -> modality values (PS3.3 C.11.1, Modality LUT Module): the first item of
    the Modality LUT Sequence when present (a table, through pydicom), else Rescale Slope and
    Rescale Intercept when both are present, else the values unchanged.

    Returns a new float32 array (float64 for 32-bit input, where float32 would round).
    """
    dtype = np.float32 if arr.dtype.itemsize <= 2 else np.float64  # noqa: PLR2004
    if ds.get("ModalityLUTSequence"):
        try:
            table: FloatArray = np.asarray(_pydicom_modality_lut(arr, ds), dtype=dtype)
        except _DECODE_FAILURES:
            raise DicomMalformedError("the Modality LUT Sequence could not be applied") from None
        return table
    out: FloatArray = arr.astype(dtype)
    rescale = _rescale(ds)
    if rescale is not None:
        slope, intercept = rescale
        if slope != 1.0:
            np.multiply(out, slope, out=out)
        if intercept != 0.0:
            np.add(out, intercept, out=out)
    return out


def apply_voi(
    arr: npt.NDArray[Any],
    ds: Dataset,
    recipe: PixelRecipe,
    *,
    value_range: tuple[float, float] | None = None,
) -> Float32Array:
    """Modality values -> [0, 1] (PS3.3 C.11.2, VOI LUT Module).

    The first Window Center / Window Width (C.11.2.1.2) with the VOI LUT Function
    (C.11.2.1.3: LINEAR by default, LINEAR_EXACT, SIGMOID; one the recipe does not list is
    DicomUnsupportedError); else the first VOI LUT Sequence item (C.11.2.1.1: a table lookup,
    output divided by 2^bits - 1 of its LUT Descriptor); else the image's own minimum and maximum
    (``value_range`` when the caller already knows them). ``recipe.voi`` False goes straight to
    minimum-maximum. Returns a new float32 array.
    """
    return _voi(arr, ds, recipe, value_range, owned=False)


def _voi(
    arr: npt.NDArray[Any],
    ds: Dataset,
    recipe: PixelRecipe,
    value_range: tuple[float, float] | None,
    *,
    owned: bool,
) -> Float32Array:
    """apply_voi; ``owned`` says ``arr`` is a float array of the caller's that may be overwritten."""
    window = _first_window(ds, recipe)
    if window is not None:
        return _window_inplace(arr if owned else _owned_float(arr), window)
    if recipe.voi and ds.get("VOILUTSequence"):
        return _voi_lut_sequence(arr, ds)
    return _min_max_inplace(arr if owned else _owned_float(arr), value_range)


def invert_monochrome1(x: FloatArray, ds: Dataset) -> FloatArray:
    """MONOCHROME1 (PS3.3 C.7.6.3.1.2: the minimum value is displayed white) -> x -> 1 - x, so
    that bright means dense for every image. Other photometric interpretations pass unchanged.

    Returns a new array, or ``x`` itself when nothing changes.
    """
    if _photometric(ds) != "MONOCHROME1":
        return x
    return _invert_inplace(np.array(x, copy=True))


def resize(x: npt.NDArray[Any], size: tuple[int, int]) -> Float32Array:
    """Resample a 2-D image to ``size`` = (rows, columns) with antialiased bilinear filtering,
    aspect ratio not kept (``model.toml``: ``resize_method = "bilinear_antialias"``).

    This is Pillow's ``Image.resize(..., BILINEAR)`` on a mode "F" image: a triangle filter
    widened by the scale factor when shrinking, coefficients and sums in double precision, float32
    out; the training reference (``resize_bilinear_antialias``) computes the same weights. 8- and
    16-bit unsigned input is handed to Pillow without a float copy. Returns a new float32 array.
    """
    if x.ndim != 2:  # noqa: PLR2004
        raise DicomUnsupportedError("only single-frame, single-sample images can be resized")
    rows, columns = size
    if x.shape == (rows, columns):
        return np.array(x, dtype=np.float32, copy=True)
    return np.array(_float_image(x).resize((columns, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def _float_image(x: npt.NDArray[Any]) -> Image.Image:
    if x.dtype in (np.dtype(np.uint8), np.dtype("=u2")):
        # Modes "L" and "I;16" wrap the array without a copy; the conversion to "F" is exact.
        return Image.fromarray(np.ascontiguousarray(x)).convert("F")
    return Image.fromarray(np.ascontiguousarray(x, dtype=np.float32))


# ---------------------------------------------------------------------------- the composition


def to_tensor(ds: Dataset, recipe: PixelRecipe) -> Float32Array:
    """One single-frame MONOCHROME1/2 instance -> float32 [channels, rows, columns] in [0, 1].

    decode -> mask_bits_stored -> apply_modality_lut -> apply_voi -> invert_monochrome1 ->
    resize -> clip. When every step from the stored values to [0, 1] is affine (Rescale
    Slope/Intercept, a LINEAR or LINEAR_EXACT window, minimum-maximum, the inversion) and the
    window clips none of this image's values, the affine map commutes with the resampling (its
    weights are non-negative and sum to one), so the stored values are resampled first and the
    map is applied to the small image: the same numbers, without full-size float passes.
    """
    _check_single_grey_frame(ds)
    stored = mask_bits_stored(decode(ds), ds)
    if stored.ndim != 2:  # noqa: PLR2004
        raise DicomUnsupportedError("the pixel data is not one frame of one sample")
    if not stored.dtype.isnative:
        stored = stored.astype(stored.dtype.newbyteorder("="))
    if stored.size == 0:
        raise DicomMalformedError("the image has no pixels")

    shortcut = _affine_display_map(stored, ds, recipe)
    if shortcut is not None:
        out = resize(stored, recipe.size)
        out *= np.float32(shortcut.scale)
        out += np.float32(shortcut.offset)
    else:
        # Each step overwrites the one float copy that apply_modality_lut made.
        values = apply_modality_lut(stored, ds) if recipe.modality_lut else _owned_float(stored)
        unit = _voi(values, ds, recipe, None, owned=True)
        del values
        if recipe.invert_monochrome1 and _photometric(ds) == "MONOCHROME1":
            unit = _invert_inplace(unit)
        out = resize(unit, recipe.size)
    np.clip(out, 0.0, 1.0, out=out)
    if recipe.channels == 1:
        return out[np.newaxis]
    return np.repeat(out[np.newaxis], recipe.channels, axis=0)


def _check_single_grey_frame(ds: Dataset) -> None:
    if _photometric(ds) not in _MONOCHROME:
        raise DicomUnsupportedError("PhotometricInterpretation must be MONOCHROME1 or MONOCHROME2 for this model")
    if _int(ds, "SamplesPerPixel", 1) != 1:
        raise DicomUnsupportedError("SamplesPerPixel must be 1 for a MONOCHROME image")
    if _int(ds, "NumberOfFrames", 1) != 1:
        raise DicomUnsupportedError("NumberOfFrames must be 1: the model takes single-frame images")


@dataclass(frozen=True, slots=True)
class _Affine:
    """y = scale * x + offset."""

    scale: float
    offset: float

    def __call__(self, x: float) -> float:
        return self.scale * x + self.offset

    def then(self, nxt: _Affine) -> _Affine:
        return _Affine(nxt.scale * self.scale, nxt.scale * self.offset + nxt.offset)


_INVERT = _Affine(-1.0, 1.0)


def _affine_display_map(stored: npt.NDArray[Any], ds: Dataset, recipe: PixelRecipe) -> _Affine | None:
    """The map stored value -> [0, 1] when it is affine on this image's values, else None."""
    if stored.dtype.kind not in "uib":
        return None
    lo, hi = float(stored.min()), float(stored.max())
    modality = _Affine(1.0, 0.0)
    if recipe.modality_lut:
        if ds.get("ModalityLUTSequence"):
            return None
        rescale = _rescale(ds)
        if rescale is not None:
            modality = _Affine(*rescale)
    window = _first_window(ds, recipe)
    if window is not None:
        voi = window.affine()
        if voi is None:
            return None
    elif recipe.voi and ds.get("VOILUTSequence"):
        return None
    else:
        a, b = modality(lo), modality(hi)
        low, high = min(a, b), max(a, b)
        voi = _Affine(1.0 / (high - low), -low / (high - low)) if high > low else _Affine(0.0, 0.0)
    composed = modality.then(voi)
    if recipe.invert_monochrome1 and _photometric(ds) == "MONOCHROME1":
        composed = composed.then(_INVERT)
    ends = (composed(lo), composed(hi))
    if min(ends) < -_CLIP_SLACK or max(ends) > 1.0 + _CLIP_SLACK:
        return None  # the window clips some values: the resampling must see them clipped
    return composed


# ------------------------------------------------------------------------- VOI implementation


@dataclass(frozen=True, slots=True)
class _Window:
    center: float
    width: float
    function: str

    def affine(self) -> _Affine | None:
        """LINEAR (C.11.2.1.2.1) and LINEAR_EXACT (C.11.2.1.3.2) before clipping; None for
        SIGMOID and for the LINEAR width of 1, a step."""
        c, w = self.center, self.width
        if self.function == "LINEAR_EXACT":
            return _Affine(1.0 / w, -(c - w / 2.0) / w)
        if self.function == "LINEAR" and w > 1.0:
            return _Affine(1.0 / (w - 1.0), 0.5 - (c - 0.5) / (w - 1.0))
        return None


def _first_window(ds: Dataset, recipe: PixelRecipe) -> _Window | None:
    if not recipe.voi:
        return None
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if _empty(center) or _empty(width):
        return None
    c, w = _first_number(center, "WindowCenter"), _first_number(width, "WindowWidth")
    raw_function = ds.get("VOILUTFunction")
    function = "LINEAR" if _empty(raw_function) else str(raw_function).strip().upper()
    if function not in recipe.voi_lut_functions:
        raise DicomUnsupportedError(
            f"VOILUTFunction must be one of {', '.join(sorted(recipe.voi_lut_functions))} for this model"
        )
    if function == "LINEAR" and w < 1.0:
        raise DicomMalformedError("WindowWidth must be at least 1 for the LINEAR VOI LUT Function")
    if w <= 0.0:
        raise DicomMalformedError("WindowWidth must be greater than 0")
    return _Window(c, w, function)


def _window_inplace(x: FloatArray, window: _Window) -> Float32Array:
    affine = window.affine()
    if affine is not None:
        np.multiply(x, affine.scale, out=x)
        np.add(x, affine.offset, out=x)
    elif window.function == "SIGMOID":
        # 1 / (1 + exp(-4 (x - c) / w)) written with tanh, which cannot overflow.
        np.subtract(x, window.center, out=x)
        np.multiply(x, 2.0 / window.width, out=x)
        np.tanh(x, out=x)
        np.multiply(x, 0.5, out=x)
        np.add(x, 0.5, out=x)
    else:  # LINEAR with width 1: a threshold at c - 0.5
        np.greater(x, window.center - 0.5, out=x)
    np.clip(x, 0.0, 1.0, out=x)
    return x.astype(np.float32, copy=False)


def _min_max_inplace(x: FloatArray, value_range: tuple[float, float] | None) -> Float32Array:
    low, high = value_range if value_range is not None else (float(x.min()), float(x.max()))
    if high > low:
        np.subtract(x, low, out=x)
        np.multiply(x, 1.0 / (high - low), out=x)
        np.clip(x, 0.0, 1.0, out=x)
    else:
        x.fill(0.0)
    return x.astype(np.float32, copy=False)


def _voi_lut_sequence(arr: npt.NDArray[Any], ds: Dataset) -> Float32Array:
    item = ds.VOILUTSequence[0]
    descriptor = item.get("LUTDescriptor")
    if _empty(descriptor) or not isinstance(descriptor, MultiValue | list) or len(descriptor) != 3:  # noqa: PLR2004
        raise DicomMalformedError("the VOI LUT Sequence item needs a LUTDescriptor of three values")
    entries, first_mapped, bits = (int(v) for v in descriptor)
    entries = entries or 65536
    if not 1 <= bits <= 16:  # noqa: PLR2004 - PS3.3 C.11.2.1.1
        raise DicomMalformedError("the VOI LUT Descriptor's bit depth must be between 1 and 16")
    table = _lut_data(item.get("LUTData"), ds)[:entries]
    if table.size == 0:
        raise DicomMalformedError("the VOI LUT Sequence item has no LUTData")
    table = np.clip(table / np.float32((1 << bits) - 1), 0.0, 1.0).astype(np.float32)
    index = np.rint(np.asarray(arr, dtype=np.float32))
    index -= first_mapped
    np.clip(index, 0, table.size - 1, out=index)
    looked_up: Float32Array = table[index.astype(np.uint16)]
    return looked_up


def _lut_data(value: object, ds: Dataset) -> npt.NDArray[np.float32]:
    if isinstance(value, bytes):  # LUTData encoded as OW: 16-bit words in the dataset's byte order
        order = "<" if ds.original_encoding[1] in (True, None) else ">"
        if len(value) % 2:
            raise DicomMalformedError("LUTData has an odd number of bytes")
        words: npt.NDArray[np.float32] = np.frombuffer(value, dtype=f"{order}u2").astype(np.float32)
        return words
    if _empty(value):
        raise DicomMalformedError("the VOI LUT Sequence item has no LUTData")
    values: Sequence[Any] = value if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        return np.asarray([float(v) for v in values], dtype=np.float32)
    except (TypeError, ValueError):
        raise DicomMalformedError("LUTData must hold numbers") from None


# -------------------------------------------------------------------------------- small parts


def _owned_float(arr: npt.NDArray[Any]) -> FloatArray:
    """A float copy this module may modify: float32, or float64 for wide input."""
    dtype = np.float64 if arr.dtype.itemsize > 4 or (arr.dtype.kind in "ui" and arr.dtype.itemsize > 2) else np.float32  # noqa: PLR2004
    return np.array(arr, dtype=dtype, copy=True)


def _invert_inplace(x: FloatArray) -> FloatArray:
    np.subtract(1.0, x, out=x)
    return x


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    """Rescale Slope and Intercept (C.11.1.1.2) when both are present, as pydicom applies them."""
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return None
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    return (
        1.0 if _empty(slope) else _first_number(slope, "RescaleSlope"),
        0.0 if _empty(intercept) else _first_number(intercept, "RescaleIntercept"),
    )


def _first_number(value: object, keyword: str) -> float:
    first = value[0] if isinstance(value, MultiValue | list) and len(value) else value
    try:
        number = float(first)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DicomMalformedError(f"{keyword} must be a number") from None
    if not math.isfinite(number):
        raise DicomMalformedError(f"{keyword} must be a finite number")
    return number


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    if _empty(value):
        return default
    number = _first_number(value, keyword)
    if number != int(number) or isinstance(value, MultiValue):
        raise DicomMalformedError(f"{keyword} must hold one integer")
    return int(number)


def _photometric(ds: Dataset) -> str:
    value = ds.get("PhotometricInterpretation")
    if _empty(value) or isinstance(value, MultiValue):
        raise DicomMalformedError("PhotometricInterpretation is missing or empty")
    return str(value).strip().upper()


def _empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, bytes | MultiValue | list | tuple):
        return len(value) == 0
    return False
