"""The structure scan that runs before pydicom must refuse bombs, never valid DICOM that pydicom
reads cleanly. Byte-level cases built here (each a 4x4 image with one structural feature spliced
in), and every test file of pydicom, pydicom-data and pynetdicom that pydicom reads without an
error or a warning."""

from __future__ import annotations

import io
import struct
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pydicom.config
import pydicom.data
import pynetdicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from app.errors import MedinferError
from app.parsing.dicom import DicomLimits, read_instance

LIMITS = DicomLimits(max_bytes=256 << 20, max_pixel_bytes=1 << 30, max_frames=1024)
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF
SOP_CLASS = b"1.2.840.10008.5.1.4.1.1.7"
ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)


def _el(tag: int, vr: str | None, value: bytes, *, length: int | None = None, little: bool = True) -> bytes:
    """One element; ``vr`` None writes an implicit-VR header."""
    order = "<" if little else ">"
    n = len(value) if length is None else length
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if vr is None:
        return head + struct.pack(order + "I", n) + value
    if vr in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(order + "I", n) + value
    return head + vr.encode() + struct.pack(order + "H", n) + value


def _item(body: bytes, *, undefined: bool = False, little: bool = True) -> bytes:
    order = "<" if little else ">"
    if undefined:
        return (
            struct.pack(order + "HHI", 0xFFFE, 0xE000, UNDEFINED) + body + struct.pack(order + "HHI", 0xFFFE, 0xE00D, 0)
        )
    return struct.pack(order + "HHI", 0xFFFE, 0xE000, len(body)) + body


def _sequence_delimiter(*, little: bool = True) -> bytes:
    return struct.pack(("<" if little else ">") + "HHI", 0xFFFE, 0xE0DD, 0)


def _meta(syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS.decode()
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.3.4"
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buffer.getvalue()


def _image(
    *, syntax: str = ExplicitVRLittleEndian, extra: bytes = b"", pixels: bytes | None = None, trailer: bytes = b""
) -> bytes:
    """A 4x4 8-bit MONOCHROME2 image; ``extra`` goes after SOPInstanceUID."""
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    order = "<" if little else ">"

    def e(tag: int, vr: str, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0" if vr in {"UI", "OB"} else b" "
        return _el(tag, None if implicit else vr, value, little=little)

    def us(value: int) -> bytes:
        return struct.pack(order + "H", value)

    body = (
        e(0x00080016, "UI", SOP_CLASS)
        + e(0x00080018, "UI", b"1.2.3.4.5.6.7.8.9")
        + extra
        + e(0x0020000D, "UI", b"1.2.3.1")
        + e(0x0020000E, "UI", b"1.2.3.2")
        + e(0x00280002, "US", us(1))
        + e(0x00280004, "CS", b"MONOCHROME2")
        + e(0x00280010, "US", us(4))
        + e(0x00280011, "US", us(4))
        + e(0x00280100, "US", us(8))
        + e(0x00280101, "US", us(8))
        + e(0x00280102, "US", us(7))
        + e(0x00280103, "US", us(0))
    )
    body += pixels if pixels is not None else e(0x7FE00010, "OB", bytes(range(16)))
    return _meta(syntax) + body + trailer


def _private_creator(*, implicit: bool = False) -> bytes:
    return _el(0x00090010, None if implicit else "LO", b"ACME_1")


def _un_private_sequence_with_implicit_item(length: int) -> bytes:
    # PS3.5 6.2.2: a private sequence a converter wrote as UN of undefined length keeps its
    # items in implicit VR. With a value length of 66 (0x42, "B") the length's low byte looks
    # like the first letter of a VR to a per-element guess.
    inner = _el(0x00091011, None, b"x" * length)
    return (
        _private_creator()
        + _el(0x00091010, "UN", b"", length=UNDEFINED)
        + _item(inner, undefined=True)
        + _sequence_delimiter()
    )


def _implicit_item_in_explicit_sequence() -> bytes:
    inner = (
        _el(0x00081150, None, SOP_CLASS + b"\0")
        + _el(0x00081155, None, b"1.2.3.4\0")
        + _el(0x00204000, None, b"z" * 66)
    )
    return _el(0x00081140, "SQ", _item(inner))


def _un_public_tag_holding_a_nested_sequence() -> bytes:
    nested = (
        _el(0x00081140, None, b"", length=UNDEFINED)
        + _item(_el(0x00081150, None, b"1.2\0"), undefined=True)
        + _sequence_delimiter()
    )
    return _el(0x00080008, "UN", b"", length=UNDEFINED) + _item(nested, undefined=True) + _sequence_delimiter()


def _fragment_holding_delimiter_bytes() -> bytes:
    fragment = b"\0" * 4 + b"\xfe\xff\xdd\xe0" + b"\x11" * 8
    return _el(0x7FE00010, "OB", b"", length=UNDEFINED) + _item(b"") + _item(fragment) + _sequence_delimiter()


def _defined_item_ending_with_an_item_delimiter() -> bytes:
    return _el(0x00081140, "SQ", _item(_el(0x00081150, "UI", SOP_CLASS + b"\0") + ITEM_DELIMITER))


def _undefined_items_in_a_defined_sequence() -> bytes:
    nested = (
        _el(0x0040A170, "SQ", b"", length=UNDEFINED)
        + _item(_el(0x00080100, "SH", b"121320"), undefined=True)
        + _sequence_delimiter()
    )
    first = _item(_el(0x00081150, "UI", SOP_CLASS + b"\0") + nested, undefined=True)
    return _el(0x00081140, "SQ", first + _item(b""))


def _implicit_private_sequences() -> bytes:
    inner = _el(0x00091011, None, b"abcd")
    undefined = _el(0x00091010, None, b"", length=UNDEFINED) + _item(inner, undefined=True) + _sequence_delimiter()
    return _private_creator(implicit=True) + undefined + _el(0x00091012, None, _item(inner))


def _big_endian_sequence() -> bytes:
    inner = _el(0x00081150, "UI", SOP_CLASS + b"\0", little=False)
    return (
        _el(0x00081140, "SQ", b"", length=UNDEFINED, little=False)
        + _item(inner, undefined=True, little=False)
        + _sequence_delimiter(little=False)
    )


VALID: dict[str, Callable[[], bytes]] = {
    "un-private-sequence-implicit-item-length-66": lambda: _image(extra=_un_private_sequence_with_implicit_item(66)),
    "un-private-sequence-implicit-item-length-26": lambda: _image(extra=_un_private_sequence_with_implicit_item(26)),
    "implicit-item-in-explicit-defined-sequence": lambda: _image(extra=_implicit_item_in_explicit_sequence()),
    "un-public-tag-holding-a-nested-sequence": lambda: _image(extra=_un_public_tag_holding_a_nested_sequence()),
    "fragment-holding-sequence-delimiter-bytes": lambda: _image(
        syntax=RLELossless, pixels=_fragment_holding_delimiter_bytes()
    ),
    "defined-item-ending-with-an-item-delimiter": lambda: _image(extra=_defined_item_ending_with_an_item_delimiter()),
    "item-delimiter-after-the-dataset": lambda: _image(trailer=ITEM_DELIMITER),
    "undefined-items-in-a-defined-sequence": lambda: _image(extra=_undefined_items_in_a_defined_sequence()),
    "implicit-private-sequences": lambda: _image(syntax=ImplicitVRLittleEndian, extra=_implicit_private_sequences()),
    "big-endian-sequence": lambda: _image(syntax=ExplicitVRBigEndian, extra=_big_endian_sequence()),
    "group-length-and-odd-length-value": lambda: _image(
        extra=_el(0x00080000, "UL", struct.pack("<I", 0)) + _el(0x00081030, "LO", b"odd")
    ),
    "4-kib-zero-padding-after-the-dataset": lambda: _image(trailer=b"\0" * 4096),
}


def _pydicom_reads_cleanly(data: bytes | Path) -> bool:
    """pydicom reads every element, sequences included, with no error and no warning.

    With pydicom's own default validation (warn): the service sets it to ignore when it starts,
    and that setting is process-wide, so tests that ran before would otherwise silence pydicom."""
    mode = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data)
            for element in [*ds.file_meta.iterall(), *ds.iterall()]:
                _ = element.value
            str(ds)
        except Exception:  # noqa: BLE001 - any failure means "not clean": the file is not used
            return False
        finally:
            pydicom.config.settings.reading_validation_mode = mode
    return not caught


@pytest.mark.parametrize("build", VALID.values(), ids=VALID.keys())
def test_valid_structures_that_pydicom_reads_are_not_refused(build: Callable[[], bytes]) -> None:
    data = build()
    assert _pydicom_reads_cleanly(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instance = read_instance(data, LIMITS)
    assert instance.sop_instance_uid == "1.2.3.4.5.6.7.8.9"


#: Files pydicom reads cleanly that are nonetheless damaged (their ends are cut off).
_KNOWN_DAMAGED = {"MR_truncated.dcm", "rtplan_truncated.dcm", "DICOMDIR-nooffset"}
#: Refusals that are policy, not structure: a file pydicom reads cleanly may get only these.
_POLICY_MESSAGES = ("is missing or empty", "TransferSyntaxUID is missing")


def _test_files() -> list[Path]:
    files = [Path(p) for p in pydicom.data.get_testdata_files()]
    files += sorted((Path(pynetdicom.__file__).parent / "tests" / "dicom_files").glob("*"))
    return sorted({f.resolve() for f in files if f.is_file() and f.name not in _KNOWN_DAMAGED})


def test_no_test_file_that_pydicom_reads_cleanly_is_refused_as_malformed() -> None:
    refused: dict[str, str] = {}
    clean = 0
    for path in _test_files():
        if path.stat().st_size > 64 << 20 or not _pydicom_reads_cleanly(path):
            continue
        clean += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                read_instance(path.read_bytes(), LIMITS)
            except MedinferError as exc:
                if not any(m in str(exc) for m in _POLICY_MESSAGES):
                    refused[path.name] = f"{type(exc).__name__}: {exc}"
    assert clean > 150, f"only {clean} clean test files found: is pydicom-data installed?"
    assert refused == {}


def _sibling() -> bytes:
    # A UN value whose item holds an OB of undefined length with no delimiter anywhere: tried as
    # a sequence, it must cost its own 32 bytes, not a search to the end of the data.
    ob = struct.pack("<HH", 0x0009, 0x1011) + b"OB\0\0" + struct.pack("<I", UNDEFINED)
    return _el(0x00091010, "UN", struct.pack("<HHI", 0xFFFE, 0xE000, len(ob)) + ob)


def test_failed_trials_of_un_values_cost_linear_time() -> None:
    # 32,000 siblings (1 MiB): about 10 s when each trial searched to the end of the data, about
    # 0.3 s linear. The bound is generous (a slow, shared CI core); quadratic cost exceeds it.
    data = _image(extra=_private_creator() + _sibling() * 32_000)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_instance(data, LIMITS)  # valid: every trial fails and the values stay opaque bytes
    assert time.perf_counter() - started < 4.0
