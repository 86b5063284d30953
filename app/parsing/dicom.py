"""DICOM Part 10 bytes -> a checked :class:`DicomInstance`, and the model's allow-lists.

The reader is strict on purpose: an instance either parses completely here, with every element
and nested sequence decoded once, or it is refused with one of the ``Dicom*Error`` types. Nothing
downstream (routing, preprocessing, the SR encoder) should meet a pydicom exception first. The
caps in :class:`DicomLimits` are enforced before anything is allocated from header values: the
encoded bytes, the inflated size of a deflated dataset, the number of elements, sequence depth,
and the pixel buffer the header declares. Pixel data is not decoded here
(``app.preprocess.pixels`` does that).

Errors name the attribute (by keyword) and, for allow-lists, the accepted values; never a value
taken from the instance, which may be PHI.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import ENCODED_VR, read_dataset, read_partial, read_preamble
from pydicom.multival import MultiValue
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from app.errors import (
    DicomMalformedError,
    DicomNotAcceptedError,
    DicomTooLargeError,
    DicomUnsupportedError,
    ModelSpecError,
)

__all__ = [
    "NATIVE_TRANSFER_SYNTAXES",
    "REQUIRED_ATTRIBUTES",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "AcceptPolicy",
    "DicomInstance",
    "DicomLimits",
    "check_policy",
    "declared_pixel_bytes",
    "file_meta_uids",
    "number_of_frames",
    "read_instance",
]

NATIVE_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)
"""Uncompressed pixel data (PS3.5 A.1-A.5): the PixelData value is the pixel buffer itself."""

SUPPORTED_TRANSFER_SYNTAXES: frozenset[str] = NATIVE_TRANSFER_SYNTAXES | frozenset(
    {
        RLELossless,  # 1.2.840.10008.1.2.5
        JPEGBaseline8Bit,  # .4.50
        JPEGExtended12Bit,  # .4.51
        JPEGLossless,  # .4.57
        JPEGLosslessSV1,  # .4.70
        JPEGLSLossless,  # .4.80
        JPEGLSNearLossless,  # .4.81
        JPEG2000Lossless,  # .4.90
        JPEG2000,  # .4.91
        # High-Throughput JPEG 2000 (.4.201-.4.203): pydicom 3 decodes them with
        # pylibjpeg-openjpeg >= 2.2, which is a dependency of this service.
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        HTJ2K,
    }
)
"""Transfer syntaxes whose pixel data ``app.preprocess.pixels.decode`` can decode here."""

REQUIRED_ATTRIBUTES: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelData",
)
"""Attributes an instance must carry (non-empty) to be read at all; the detail names the first
one missing."""

_SAMPLES_FOR_PHOTOMETRIC: Mapping[str, int] = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_ICT": 3,
    "YBR_RCT": 3,
    "YBR_PARTIAL_420": 3,
}

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_MAX_CHARS = 64
_PREAMBLE = 128
_PREFIX = b"DICM"
_INFLATE_CHUNK = 1 << 20

# What pydicom (and zlib, struct, numpy under it) raise on damaged input: pydicom's own two
# exception types and builtins. RuntimeError covers NotImplementedError and RecursionError
# (undefined-length sequences are parsed recursively while reading); ValueError covers
# UnicodeDecodeError; LookupError covers KeyError and IndexError; ArithmeticError covers
# OverflowError. pydicom reports some damage (a truncated file, a VR that contradicts the
# transfer syntax) as a UserWarning and reads on; where warnings are errors (``-W error``, the
# test suite) that warning arrives here as an exception, and it means the same damage.
_PARSE_FAILURES: tuple[type[Exception], ...] = (
    UserWarning,
    InvalidDicomError,
    BytesLengthException,
    EOFError,
    OSError,
    struct.error,
    zlib.error,
    ValueError,
    TypeError,
    AttributeError,
    LookupError,
    ArithmeticError,
    RuntimeError,
)


@dataclass(frozen=True, slots=True)
class DicomLimits:
    """Caps for one instance, enforced by :func:`read_instance` before any pixel is decoded.

    ``max_bytes`` bounds the encoded bytes and, for Deflated Explicit VR Little Endian, the
    inflated dataset too. ``max_pixel_bytes`` bounds the pixel buffer the header declares
    (:func:`declared_pixel_bytes`). ``max_elements`` and ``max_depth`` bound the work of walking
    the dataset (every element, every sequence item, at any depth).
    """

    max_bytes: int
    max_pixel_bytes: int
    max_frames: int
    max_elements: int = 200_000
    max_depth: int = 16


@dataclass(frozen=True, slots=True)
class DicomInstance:
    """One read and checked instance. ``dataset`` is fully parsed; its pixel data is not decoded.

    ``patient_id`` is PHI: it lives in memory for the study grouping and the audit (which stores
    a keyed pseudonym); never put it in a log, a metric or an error detail.
    """

    dataset: Dataset
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str | None
    modality: str | None
    body_part: str | None
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class AcceptPolicy:
    """A model's allow-lists from ``model.toml`` ``[preprocessing]``. An empty set accepts anything;
    ``frames`` None accepts any number of frames.

    Code strings (modalities, body parts, view positions, photometric interpretations) are kept
    upper case and compared case-insensitively after stripping; SOP Class UIDs compare exactly.
    """

    modalities: frozenset[str]
    sop_classes: frozenset[str]
    body_parts: frozenset[str]
    view_positions: frozenset[str]
    photometric: frozenset[str]
    frames: int | None

    @classmethod
    def from_preprocessing(cls, preprocessing: Mapping[str, Any]) -> AcceptPolicy:
        """Read the allow-lists; a key that is absent accepts anything.

        Raises ModelSpecError naming the key when a value has the wrong type.
        """
        frames = preprocessing.get("frames")
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
            raise ModelSpecError("preprocessing.frames must be a positive integer")
        return cls(
            modalities=_codes(preprocessing, "modalities"),
            sop_classes=_uids(preprocessing, "sop_classes"),
            body_parts=_codes(preprocessing, "body_parts"),
            view_positions=_codes(preprocessing, "view_positions"),
            photometric=_codes(preprocessing, "photometric"),
            frames=frames,
        )


def _strings(preprocessing: Mapping[str, Any], key: str) -> list[str]:
    value = preprocessing.get(key, [])
    if not isinstance(value, list | tuple | frozenset | set) or not all(
        isinstance(v, str) and v.strip() for v in value
    ):
        raise ModelSpecError(f"preprocessing.{key} must be a list of non-empty strings")
    return [v.strip() for v in value]


def _codes(preprocessing: Mapping[str, Any], key: str) -> frozenset[str]:
    return frozenset(v.upper() for v in _strings(preprocessing, key))


def _uids(preprocessing: Mapping[str, Any], key: str) -> frozenset[str]:
    values = _strings(preprocessing, key)
    for v in values:
        if not _is_uid(v):
            raise ModelSpecError(f"preprocessing.{key} must hold DICOM UIDs (digits and dots, at most 64 characters)")
    return frozenset(values)


def _is_uid(value: str) -> bool:
    return len(value) <= _UID_MAX_CHARS and _UID.fullmatch(value) is not None


# ------------------------------------------------------------------------------------ reading


_META_LIMITS = DicomLimits(max_bytes=1 << 20, max_pixel_bytes=1, max_frames=1, max_elements=256, max_depth=1)
"""A File Meta Information holds about eight elements and no sequence (PS3.10 7.1)."""


def read_instance(data: bytes, limits: DicomLimits) -> DicomInstance:
    """Parse and check one DICOM Part 10 instance (PS3.10 7.1) without decoding its pixels.

    In order: the byte cap; the preamble and ``DICM`` prefix; the File Meta Information and its
    Transfer Syntax (unsupported: DicomUnsupportedError naming the UID); for a deflated dataset,
    the inflated size; a scan of the encoded structure (:class:`_StructureScan`: element and
    depth caps, values that run past the end) before pydicom builds anything; the parse itself;
    a walk over every element and sequence item (the same caps, on what pydicom built); the
    required attributes; SOP Instance UID against the meta; the Image Pixel module's
    consistency; and the frame and pixel-buffer caps, from the header alone.

    Raises DicomTooLargeError, DicomMalformedError or DicomUnsupportedError; never a pydicom,
    struct or zlib exception.
    """
    if len(data) > limits.max_bytes:
        raise DicomTooLargeError(f"the instance is larger than {limits.max_bytes} bytes")
    if len(data) < _PREAMBLE + len(_PREFIX) or data[_PREAMBLE : _PREAMBLE + len(_PREFIX)] != _PREFIX:
        raise DicomMalformedError("not a DICOM Part 10 file: no 'DICM' prefix after the 128-byte preamble")

    _StructureScan(data, _META_LIMITS, implicit=False, little=True).run(_PREAMBLE + len(_PREFIX), meta_only=True)
    transfer_syntax, dataset_offset = _read_meta(data)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        inflated = _inflate(memoryview(data)[dataset_offset:], limits.max_bytes)
        _StructureScan(inflated, limits, implicit=False, little=True).run(0)
        del inflated
    else:
        implicit = transfer_syntax == ImplicitVRLittleEndian
        little = transfer_syntax != ExplicitVRBigEndian
        _StructureScan(data, limits, implicit=implicit, little=little).run(dataset_offset)

    try:
        ds = read_partial(io.BytesIO(data), force=False)
        _walk(ds.file_meta, limits, 0, [0])
        _walk(ds, limits, 0, [0])
    except _PARSE_FAILURES as exc:
        raise DicomMalformedError(f"the DICOM dataset could not be parsed ({type(exc).__name__})") from None

    for keyword in REQUIRED_ATTRIBUTES:
        if _is_empty(ds.get(keyword)):
            raise DicomMalformedError(f"{keyword} is missing or empty")

    sop_instance_uid = _uid_attr(ds, "SOPInstanceUID")
    meta_instance = ds.file_meta.get("MediaStorageSOPInstanceUID")
    if not _is_empty(meta_instance) and str(meta_instance).strip() != sop_instance_uid:
        raise DicomMalformedError("SOPInstanceUID differs from MediaStorageSOPInstanceUID in the File Meta Information")

    _check_pixel_module(ds, transfer_syntax)
    frames = number_of_frames(ds)
    if frames > limits.max_frames:
        raise DicomTooLargeError(f"NumberOfFrames is over the cap of {limits.max_frames}")
    if declared_pixel_bytes(ds) > limits.max_pixel_bytes:
        raise DicomTooLargeError(
            f"the declared pixel buffer (Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated) "
            f"is over the cap of {limits.max_pixel_bytes} bytes"
        )
    _check_pixel_data_element(ds, transfer_syntax)

    return DicomInstance(
        dataset=ds,
        study_uid=_uid_attr(ds, "StudyInstanceUID"),
        series_uid=_uid_attr(ds, "SeriesInstanceUID"),
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=_uid_attr(ds, "SOPClassUID"),
        transfer_syntax_uid=transfer_syntax,
        patient_id=_optional_text(ds, "PatientID"),
        modality=_optional_text(ds, "Modality"),
        body_part=_optional_text(ds, "BodyPartExamined"),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def file_meta_uids(data: bytes) -> tuple[str | None, str | None]:
    """The SOP Class and SOP Instance UIDs that the File Meta Information names (Media Storage
    SOP Class / Instance UID, PS3.10 7.1), or None for each that cannot be read.

    For describing an instance that :func:`read_instance` refused (the STOW-RS FailedSOPSequence
    names it where it can): only the preamble and the meta are read, within
    :data:`_META_LIMITS`, whatever follows them; a refused instance may be a bomb, and
    re-reading it with pydicom would cost what the refusal just spared. Never raises.
    """
    if len(data) < _PREAMBLE + len(_PREFIX) or data[_PREAMBLE : _PREAMBLE + len(_PREFIX)] != _PREFIX:
        return None, None
    try:
        _StructureScan(data, _META_LIMITS, implicit=False, little=True).run(_PREAMBLE + len(_PREFIX), meta_only=True)
        fp = io.BytesIO(data)
        read_preamble(fp, False)  # noqa: FBT003 - pydicom's positional ``force``
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_group_0002)
        values = meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")
    except (DicomMalformedError, DicomTooLargeError):
        return None, None
    except _PARSE_FAILURES:
        return None, None
    uids = [str(v).strip() if isinstance(v, str) and _is_uid(str(v).strip()) else None for v in values]
    return uids[0], uids[1]


def _read_meta(data: bytes) -> tuple[str, int]:
    """The Transfer Syntax UID from the File Meta Information, and where the dataset starts.

    Read before the dataset so that an unsupported syntax is reported as such, not as whatever
    a parse under the wrong encoding raises, and so that a deflated dataset is measured before
    pydicom inflates it.
    """
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)  # noqa: FBT003 - pydicom's positional ``force``
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_group_0002)
        offset = fp.tell()
        value = meta.get("TransferSyntaxUID")
    except _PARSE_FAILURES:
        raise DicomMalformedError("the File Meta Information could not be parsed") from None
    if _is_empty(value) or isinstance(value, MultiValue):
        raise DicomMalformedError("TransferSyntaxUID is missing from the File Meta Information")
    syntax = str(value).strip()
    if not _is_uid(syntax):
        raise DicomMalformedError("TransferSyntaxUID is not a valid UID")
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        name = UID(syntax).name
        described = f"{syntax} ({name})" if name != syntax else syntax
        raise DicomUnsupportedError(f"transfer syntax {described} is not supported")
    return syntax, offset


def _not_group_0002(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 != 2  # noqa: PLR2004 - the File Meta Information group


def _inflate(deflated: memoryview, cap: int) -> bytes:
    """Inflate in bounded chunks to refuse a deflate bomb before pydicom inflates the whole
    dataset in one call (PS3.5 A.5); the result (at most ``cap`` bytes) is what gets scanned."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    chunks: list[bytes] = []
    pending: bytes | memoryview = deflated
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            total += len(chunk)
            if total > cap:
                raise DicomTooLargeError(f"the inflated dataset is larger than {cap} bytes")
            chunks.append(chunk)
            if not chunk and len(inflater.unconsumed_tail) == len(pending):
                break  # no progress: the stream is cut short; pydicom's own inflate will say so
            pending = inflater.unconsumed_tail
    except zlib.error:
        raise DicomMalformedError("the deflated dataset could not be inflated") from None
    return b"".join(chunks)


_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
_LONG_LENGTH_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_META_GROUP = 0x0002


class _Unreadable(Exception):  # noqa: N818 - internal, never leaves this module
    """The bytes break the encoding rules at this point. Inside a value that only might be a
    sequence it means "not a sequence after all"; anywhere else it becomes DicomMalformedError."""


#: The bytes of an explicit VR's two letters (pydicom's test in ``filereader._is_implicit_vr``).
_VR_LETTERS: Final = range(0x41, 0x5B)


class _StructureScan:
    """Walk the encoded element headers and sequence items of a dataset (PS3.5 7.1 and 7.5)
    before pydicom parses it, following pydicom's rules for where a sequence is, and count them.

    pydicom builds a Python object for every element and item it reads (~250 bytes each) before
    anything can count them: sequences of undefined length are parsed as they are read, those of
    defined length when first touched, at any depth. A 16 MiB instance of empty elements inside
    sequence items (or a few KiB of them, deflated) would cost gigabytes and minutes there. Here
    the same headers cost a ``struct.unpack_from`` each, and the walk stops at
    ``max_elements`` (elements and items together, at every depth) and ``max_depth``.

    It is also stricter than pydicom in one way that matters: a value whose declared length runs
    past the end of the data, or of the item holding it, is a truncated or forged instance
    (pydicom reads what is there and goes on), and so is an item or delimiter out of place.

    Values of VR UN, of implicit-VR private tags and of unknown tags might be sequences (pydicom
    decides from its dictionaries and the bytes): when they start with an item, they are walked
    too, and only their caps, not their structure, can refuse the instance.
    """

    def __init__(self, data: bytes, limits: DicomLimits, *, implicit: bool, little: bool) -> None:
        self.data = data
        self.end = len(data)
        self.limits = limits
        self.implicit = implicit
        self.order = "<" if little else ">"
        self.delimiter = struct.pack(self.order + "HH", _SEQUENCE_DELIMITER >> 16, _SEQUENCE_DELIMITER & 0xFFFF)
        self.count = 0

    def run(self, start: int, *, meta_only: bool = False) -> None:
        try:
            self._dataset(start, None, 0, top=True, meta_only=meta_only)
        except _Unreadable as exc:
            raise DicomMalformedError(f"the DICOM dataset is malformed: {exc}") from None

    def _tick(self) -> None:
        self.count += 1
        if self.count > self.limits.max_elements:
            raise DicomTooLargeError(f"the dataset has more than {self.limits.max_elements} elements")

    def _tag(self, pos: int) -> int:
        group, elem = struct.unpack_from(self.order + "HH", self.data, pos)
        return int(group) << 16 | int(elem)

    def _header(self, pos: int) -> tuple[str | None, int, int]:
        """(VR or None where it is implicit, header length, value length) as pydicom reads them."""
        if not self.implicit:
            raw = self.data[pos + 4 : pos + 6]
            if raw in ENCODED_VR:
                vr = raw.decode("ascii")
                if vr in _LONG_LENGTH_VRS:
                    if pos + 12 > self.end:
                        raise _Unreadable("the data ends inside an element header")
                    return vr, 12, int(struct.unpack_from(self.order + "I", self.data, pos + 8)[0])
                return vr, 8, int(struct.unpack_from(self.order + "H", self.data, pos + 6)[0])
            if b"AA" <= raw <= b"ZZ":  # an unknown VR: pydicom reads a 2-byte length
                return raw.decode("latin-1"), 8, int(struct.unpack_from(self.order + "H", self.data, pos + 6)[0])
            # Not a VR at all: pydicom takes this one element as implicit VR (a known writer bug).
        return None, 8, int(struct.unpack_from(self.order + "I", self.data, pos + 4)[0])

    def _dataset(self, pos: int, limit: int | None, depth: int, *, top: bool = False, meta_only: bool = False) -> int:
        """Elements up to ``limit`` (a defined-length item), an item delimiter (``limit`` None,
        not ``top``) or the end of the data (``top``); returns where the dataset ends."""
        saved = self.implicit
        if not self.implicit and pos + 6 <= self.end and not meta_only:
            # pydicom decides once per dataset (and item), from its first element, whether it is
            # implicit VR: an explicit-VR file may hold implicit-VR items (PS3.5 6.2.2, a
            # private sequence converted as UN of undefined length). So does the scan.
            self.implicit = not (self.data[pos + 4] in _VR_LETTERS and self.data[pos + 5] in _VR_LETTERS)
        try:
            while True:
                end = self._end_of_dataset(pos, limit, top=top, meta_only=meta_only)
                if end is not None:
                    return end
                pos = self._element(pos, limit, depth)
        finally:
            self.implicit = saved

    def _end_of_dataset(self, pos: int, limit: int | None, *, top: bool, meta_only: bool) -> int | None:
        """Where the dataset ends if it ends at ``pos``, else None (an element starts there)."""
        if limit is not None and pos >= limit:
            if pos > limit:
                raise _Unreadable("an element runs past the end of its item")
            return pos
        if pos + 8 > self.end:
            if top:
                return pos  # as pydicom: fewer than 8 trailing bytes end the dataset
            raise _Unreadable("the data ends inside a sequence item")
        tag = self._tag(pos)
        if meta_only and tag >> 16 != _META_GROUP:
            return pos
        if tag == _ITEM_DELIMITER:
            return self._item_delimiter(pos, limit, top=top)
        if tag in {_ITEM, _SEQUENCE_DELIMITER}:
            raise _Unreadable("a sequence item or delimiter outside a sequence")
        return None

    @staticmethod
    def _item_delimiter(pos: int, limit: int | None, *, top: bool) -> int:
        if limit is None and not top:
            return pos + 8  # the end of an item of undefined length
        if top:
            return pos  # after the dataset: pydicom stops reading there and ignores what follows
        if pos + 8 == limit:
            return limit  # a defined-length item that also carries a delimiter (a writer quirk)
        raise _Unreadable("an item delimiter outside an item of undefined length")

    def _element(self, pos: int, limit: int | None, depth: int) -> int:
        """One element (with any sequence in its value); returns where the next one starts."""
        tag = self._tag(pos)
        vr, header, length = self._header(pos)
        self._tick()
        value = pos + header
        if length == _UNDEFINED_LENGTH:
            if self._undefined_is_sequence(tag, vr, value):
                return self._sequence(value, None, depth)
            return self._undefined_value(value)
        stop = value + length
        if stop > self.end or (limit is not None and stop > limit):
            raise _Unreadable("an element's value runs past the end of the data")
        kind = self._defined_kind(tag, vr, value, length)
        if kind == "sequence":
            self._within(stop, self._sequence, value, stop, depth)
        elif kind == "maybe":
            counted = self.count
            try:
                self._within(stop, self._sequence, value, stop, depth)
            except _Unreadable:
                self.count = counted  # not a sequence: opaque bytes, as pydicom will see them
        return stop

    def _undefined_value(self, value: int) -> int:
        """Where an undefined-length value that is not a sequence ends: its items, as pydicom
        reads encapsulated pixel data, else the first sequence delimiter (pydicom's fallback)."""
        pos = value
        while pos + 8 <= self.end:
            tag = self._tag(pos)
            if tag == _SEQUENCE_DELIMITER:
                return pos + 8
            if tag != _ITEM:
                break
            self._tick()  # pydicom walks each fragment in Python: count them like items
            pos += 8 + int(struct.unpack_from(self.order + "I", self.data, pos + 4)[0])
        found = self.data.find(self.delimiter, value, self.end)
        if found < 0 or found + 8 > self.end:
            raise _Unreadable("a value of undefined length has no sequence delimiter")
        return found + 8

    def _within(self, stop: int, walk: Callable[..., int], *args: Any) -> int:
        """Run ``walk`` with the data ending at ``stop`` (a defined length): nothing past it can
        belong to this value, so no search or walk inside it may cost more than its own bytes."""
        saved, self.end = self.end, stop
        try:
            return walk(*args)
        finally:
            self.end = saved

    def _sequence(self, pos: int, limit: int | None, depth: int) -> int:
        """Items up to ``limit`` or a sequence delimiter; ``depth`` is that of the dataset holding
        the sequence, as in :func:`_walk`."""
        if depth >= self.limits.max_depth:
            raise DicomMalformedError(f"sequences are nested deeper than {self.limits.max_depth} levels")
        while True:
            if limit is not None and pos >= limit:
                if pos > limit:
                    raise _Unreadable("an item runs past the end of its sequence")
                return pos
            if pos + 8 > self.end:
                raise _Unreadable("the data ends inside a sequence")
            tag = self._tag(pos)
            length = int(struct.unpack_from(self.order + "I", self.data, pos + 4)[0])
            if tag == _SEQUENCE_DELIMITER:
                return pos + 8
            if tag != _ITEM:
                raise _Unreadable("a sequence holds something other than items")
            self._tick()
            if length == _UNDEFINED_LENGTH:
                pos = self._dataset(pos + 8, None, depth + 1)
                continue
            stop = pos + 8 + length
            if stop > self.end or (limit is not None and stop > limit):
                raise _Unreadable("an item runs past the end of its sequence")
            self._dataset(pos + 8, stop, depth + 1)
            pos = stop

    def _starts_with_item(self, pos: int) -> bool:
        return pos + 4 <= self.end and self._tag(pos) == _ITEM

    def _undefined_is_sequence(self, tag: int, vr: str | None, value: int) -> bool:
        """pydicom's rule for a value of undefined length: SQ, or (implicit or UN) a tag its
        dictionary calls SQ, or an unknown tag whose value starts with an item."""
        if vr in {"SQ", "UN"}:
            return True
        if vr is not None:
            return False
        known = _dictionary_vr(tag)
        return known == "SQ" if known is not None else self._starts_with_item(value)

    def _defined_kind(self, tag: int, vr: str | None, value: int, length: int) -> str:
        """ "sequence", "maybe" (pydicom may parse it as one when it is touched) or "bytes"."""
        if vr == "SQ":
            return "sequence"
        if vr not in {None, "UN"} or length == 0:
            return "bytes"
        known = _dictionary_vr(tag)
        if known is not None and not tag >> 16 & 1:
            if known != "SQ":
                return "bytes"
            return "sequence" if vr is None else "maybe"
        return "maybe" if self._starts_with_item(value) else "bytes"


def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _walk(ds: Dataset, limits: DicomLimits, depth: int, seen: list[int]) -> None:
    """Convert every element once, recursing into sequence items, so damage surfaces here."""
    for elem in ds:
        seen[0] += 1
        if seen[0] > limits.max_elements:
            raise DicomTooLargeError(f"the dataset has more than {limits.max_elements} elements")
        if elem.VR == "SQ":
            if depth >= limits.max_depth:
                raise DicomMalformedError(f"sequences are nested deeper than {limits.max_depth} levels")
            for item in elem.value:
                _walk(item, limits, depth + 1, seen)


def _is_empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str | bytes | MultiValue | list):
        return len(value) == 0 or (isinstance(value, str) and not value.strip())
    return False


def _uid_attr(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if isinstance(value, MultiValue) or not isinstance(value, str):
        raise DicomMalformedError(f"{keyword} must hold one UID")
    uid = value.strip()
    if not _is_uid(uid):
        raise DicomMalformedError(f"{keyword} is not a valid UID")
    return uid


def _optional_text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if _is_empty(value):
        return None
    if isinstance(value, MultiValue):
        raise DicomMalformedError(f"{keyword} must hold one value")
    return str(value).strip() or None


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if _is_empty(value):
        if default is None:
            raise DicomMalformedError(f"{keyword} is missing or empty")
        return default
    if isinstance(value, MultiValue | bytes | bool) or not isinstance(value, int | float | str):
        raise DicomMalformedError(f"{keyword} must hold one integer")
    try:
        number = float(value)
    except ValueError:
        raise DicomMalformedError(f"{keyword} must hold one integer") from None
    if not math.isfinite(number) or number != int(number):
        raise DicomMalformedError(f"{keyword} must hold one integer")
    return int(number)


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames (PS3.3 C.7.6.6), 1 when absent; DicomMalformedError when not >= 1."""
    frames = _int_attr(ds, "NumberOfFrames", default=1)
    if frames < 1:
        raise DicomMalformedError("NumberOfFrames must be at least 1")
    return frames


def declared_pixel_bytes(ds: Dataset) -> int:
    """The pixel buffer the header declares: Rows x Columns x NumberOfFrames x SamplesPerPixel
    x ceil(BitsAllocated / 8) bytes (1-bit data counted as a byte per sample, an upper bound).

    Pure arithmetic on header values (Python integers, no overflow), so a header declaring
    65535 x 65535 x 1000 frames is refused without allocating anything.
    """
    rows = _int_attr(ds, "Rows")
    columns = _int_attr(ds, "Columns")
    samples = _int_attr(ds, "SamplesPerPixel")
    bits = _int_attr(ds, "BitsAllocated")
    if min(rows, columns, samples, bits) < 1:
        raise DicomMalformedError("Rows, Columns, SamplesPerPixel and BitsAllocated must be at least 1")
    return rows * columns * number_of_frames(ds) * samples * math.ceil(bits / 8)


def _check_pixel_module(ds: Dataset, transfer_syntax: str) -> None:
    """Image Pixel module consistency (PS3.3 C.7.6.3): sample count against the photometric
    interpretation, Bits Allocated / Bits Stored / High Bit, Pixel Representation."""
    photometric = ds.get("PhotometricInterpretation")
    if isinstance(photometric, MultiValue) or not isinstance(photometric, str):
        raise DicomMalformedError("PhotometricInterpretation must hold one value")
    samples = _int_attr(ds, "SamplesPerPixel")
    expected = _SAMPLES_FOR_PHOTOMETRIC.get(photometric.strip().upper())
    if expected is None:
        raise DicomUnsupportedError("PhotometricInterpretation is not one this service can decode")
    if samples != expected:
        raise DicomMalformedError("SamplesPerPixel does not fit the PhotometricInterpretation")
    allocated = _int_attr(ds, "BitsAllocated")
    stored = _int_attr(ds, "BitsStored")
    if allocated != 1 and (allocated % 8 or allocated > 64):  # noqa: PLR2004 - PS3.5 8.1.1
        raise DicomMalformedError("BitsAllocated must be 1 or a multiple of 8 up to 64")
    if not 1 <= stored <= allocated:
        raise DicomMalformedError("BitsStored must be between 1 and BitsAllocated")
    high_bit = _int_attr(ds, "HighBit", default=stored - 1)
    if high_bit != stored - 1:
        # PS3.5 8.1.1 used to allow the stored bits anywhere in the allocated ones; no decoder
        # here honours that, so such pixels would be misread.
        raise DicomUnsupportedError("HighBit must be BitsStored - 1")
    if _int_attr(ds, "PixelRepresentation", default=0) not in (0, 1):
        raise DicomMalformedError("PixelRepresentation must be 0 or 1")
    if samples > 1 and _int_attr(ds, "PlanarConfiguration", default=0) not in (0, 1):
        raise DicomMalformedError("PlanarConfiguration must be 0 or 1")
    if transfer_syntax in NATIVE_TRANSFER_SYNTAXES and photometric.strip().upper() not in _NATIVE_PHOTOMETRIC:
        raise DicomMalformedError("PhotometricInterpretation is only defined for compressed pixel data")


_NATIVE_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422"})


def _check_pixel_data_element(ds: Dataset, transfer_syntax: str) -> None:
    """Native pixel data must hold the whole declared buffer; encapsulated pixel data must be
    encapsulated (PS3.5 A.4). Checked here so that a truncated buffer is refused as malformed
    before any decoder sees it."""
    elem = ds["PixelData"]
    if transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
        if elem.is_undefined_length:
            raise DicomMalformedError("PixelData is encapsulated but the transfer syntax is uncompressed")
        rows, columns = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
        samples = _int_attr(ds, "SamplesPerPixel")
        if str(ds.PhotometricInterpretation).strip().upper() == "YBR_FULL_422":
            samples = 2  # chroma subsampled horizontally: Y Y Cb Cr per two pixels (PS3.3 C.7.6.3.1.2)
        bits = rows * columns * number_of_frames(ds) * samples * _int_attr(ds, "BitsAllocated")
        if len(elem.value) < math.ceil(bits / 8):
            raise DicomMalformedError("PixelData is shorter than its header declares")
    elif not elem.is_undefined_length:
        raise DicomMalformedError("PixelData is not encapsulated but the transfer syntax is compressed")


# ------------------------------------------------------------------------------------- policy


def check_policy(instance: DicomInstance, policy: AcceptPolicy) -> None:
    """Refuse an instance outside the model's allow-lists (DicomNotAcceptedError).

    The detail names the attribute and the accepted values, or says the attribute is missing;
    it never repeats the instance's own value.
    """
    ds = instance.dataset
    if policy.sop_classes and instance.sop_class_uid not in policy.sop_classes:
        raise DicomNotAcceptedError(f"SOPClassUID must be one of {_listed(policy.sop_classes)}")
    _check_code(ds, "Modality", policy.modalities)
    _check_code(ds, "BodyPartExamined", policy.body_parts)
    _check_code(ds, "ViewPosition", policy.view_positions)
    _check_code(ds, "PhotometricInterpretation", policy.photometric)
    if policy.frames is not None and number_of_frames(ds) != policy.frames:
        raise DicomNotAcceptedError(f"NumberOfFrames must be {policy.frames}")


def _check_code(ds: Dataset, keyword: str, accepted: frozenset[str]) -> None:
    if not accepted:
        return
    value = ds.get(keyword)
    if _is_empty(value):
        raise DicomNotAcceptedError(f"{keyword} is missing; the model accepts {_listed(accepted)}")
    if isinstance(value, MultiValue) or str(value).strip().upper() not in accepted:
        raise DicomNotAcceptedError(f"{keyword} must be one of {_listed(accepted)}")


def _listed(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))
