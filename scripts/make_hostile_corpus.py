"""Generate ``tests/corpus/hostile``: hostile request bodies for every way in, and their index.

Run from the repository root (the output is the same bytes on every run)::

    PYTHONPATH=. .venv/bin/python scripts/make_hostile_corpus.py          # (re)write the corpus
    PYTHONPATH=. .venv/bin/python scripts/make_hostile_corpus.py --check  # is the committed one current?

Families: ``dicom`` (truncated, bit-flipped, huge declared lengths, deeply nested and very wide
sequences, pixel bombs, compressed pixel bombs, deflate bombs), ``jwe`` (every field mutated in the
compact and JSON serialisations, ``zip: DEF`` bombs, huge headers, unknown alg/enc/kid, ``crit``,
hostile plaintexts behind valid encryption), ``fhir`` (10,000-level nesting, a million entries,
wrong types) and ``multipart`` (no boundary, unterminated, 10,000 tiny parts, a 1 MB part header).

``index.json`` lists each file with the endpoint it targets, its Content-Type, the 4xx statuses
that are a correct answer, and how it is stored and sent: ``storage: "gzip"`` files are kept
gzip-compressed here (a million FHIR entries, a 16 MiB chunked body) and are sent expanded;
``transfer: "chunked"`` bodies are streamed without a Content-Length; ``decodes_pixels`` marks the
few that decode a pixel buffer at the cap before they are refused (their memory is that of a
legitimate image of that size). ``controls`` are valid requests (200) that prove the harness
reaches the code under test (a mutation of a JWE only means something if the unmutated JWE opens)
and load every pixel decoder once, so that a payload's memory is its own, not a codec library's.
The expected statuses assume the caps the test serves with: 16 MiB bodies and instances, 64 MiB
pixel buffers (see ``tests/integration/test_hostile_payloads.py``).

JWE bodies need the recipient's private key on the server, and the service's keys are generated
per data directory. So the corpus carries a TEST-ONLY key directory, ``keys/``, in the key
store's own format (``<kid>.key.json``, the private JWK sealed with ``dir`` + A256GCM under the
key-encryption key derived from :data:`TEST_KEK`). Serve with ``MEDINFER_KEYS_DIR`` pointing at a
copy of it and ``MEDINFER_KEY_ENCRYPTION_KEY`` set to :data:`TEST_KEK`. The key is derived from a
fixed seed and protects nothing; every ephemeral key, CEK and IV is derived from seeds too, so
the JWE files are byte-for-byte reproducible.

DICOM bases: a 64 x 64 synthetic chest phantom (``training.dicom_studies``), and prefixes of
pydicom's real ``RG1_UNCR.dcm`` chest CR (``download=False``: the copy installed with
pydicom-data). Bit-flip mutants are kept only if the service's own reader and preprocessing
refuse them in-process (or raise anything at all); a flip inside a text value leaves a valid
image, which is not a hostile payload.
"""

from __future__ import annotations

import argparse
import base64
import copy
import filecmp
import gzip
import hashlib
import io
import json
import shutil
import struct
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom.config
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from training.dicom_studies import phantom_dataset

ROOT: Final = Path(__file__).resolve().parent.parent
OUT: Final = ROOT / "tests" / "corpus" / "hostile"

CXR: Final = "/v1/models/cxr-pneumonia/predict"
EHR: Final = "/v1/models/ehr-heart-disease/predict"
STOW: Final = "/dicomweb/studies"
DICOM: Final = "application/dicom"
FHIR: Final = "application/fhir+json"
JOSE: Final = "application/jose"
JOSE_JSON: Final = "application/jose+json"

#: The key-encryption key that seals the test key directory. Test-only, like the key it seals.
TEST_KEK: Final = "hostile-corpus-test-kek-not-a-secret-0123456789"
TEST_KID: Final = "hostile-test-ec-p256"
TEST_KEY_CREATED: Final = "2026-01-01T00:00:00+00:00"

MIB: Final = 1 << 20
UNDEFINED: Final = 0xFFFFFFFF
HUGE_LENGTH: Final = 0xFFFFFFF0
_LONG_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM: Final = (0xFFFE, 0xE000)
_ITEM_DELIMITER: Final = (0xFFFE, 0xE00D)
_SEQUENCE_DELIMITER: Final = (0xFFFE, 0xE0DD)
_CONTENT_SEQUENCE: Final = 0x0040A730  # an SQ between the phantom's header and its PixelData
_PIXEL_DATA: Final = 0x7FE00010

BIT_FLIP_MUTANTS: Final = 14
DICOM_REFUSALS: Final = (400, 413, 415, 422)
"""Every status the imaging path documents for an instance it refuses (docs/imaging.md)."""


# ------------------------------------------------------------------------------ determinism


def det_bytes(label: str, n: int) -> bytes:
    """``n`` pseudo-random bytes named by ``label``: the corpus's only source of randomness."""
    return hashlib.shake_256(label.encode()).digest(n)


def det_int(label: str, bound: int) -> int:
    return int.from_bytes(det_bytes(label, 8), "big") % bound


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# -------------------------------------------------------------------------------- the index


@dataclass
class Entry:
    """One request of the corpus; ``index.json`` holds a list of these."""

    file: str
    family: str
    endpoint: str
    content_type: str
    expect: list[int]
    note: str
    size: int
    storage: str = "raw"  # "gzip": stored compressed here, sent expanded
    transfer: str = "length"  # "chunked": sent without Content-Length
    decodes_pixels: bool = False  # a pixel buffer at the cap is decoded before the refusal
    sha256: str = ""


LISTS: Final = ("entries", "controls")


@dataclass
class Corpus:
    root: Path
    entries: list[Entry] = field(default_factory=list)
    controls: list[Entry] = field(default_factory=list)

    def add(
        self,
        family: str,
        name: str,
        body: bytes,
        *,
        endpoint: str,
        content_type: str,
        expect: Iterable[int],
        note: str,
        chunked: bool = False,
        control: bool = False,
        decodes_pixels: bool = False,
    ) -> None:
        relative = f"{family}/{name}"
        if any(e.file.removesuffix(".gz") == relative for e in [*self.entries, *self.controls]):
            raise ValueError(f"duplicate corpus name {relative}")
        storage = "raw"
        stored = body
        if len(body) > 16 * 1024:
            packed = gzip.compress(body, compresslevel=9, mtime=0)
            if len(packed) * 2 < len(body):
                storage, stored, relative = "gzip", packed, relative + ".gz"
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(stored)
        entry = Entry(
            file=relative,
            family=family,
            endpoint=endpoint,
            content_type=content_type,
            expect=sorted(set(expect)),
            note=note,
            size=len(body),
            storage=storage,
            transfer="chunked" if chunked else "length",
            decodes_pixels=decodes_pixels,
            sha256=hashlib.sha256(body).hexdigest(),
        )
        (self.controls if control else self.entries).append(entry)

    def body(self, relative: str) -> bytes:
        """The bytes of an entry written earlier, as sent."""
        entry = next(e for e in [*self.entries, *self.controls] if e.file.removesuffix(".gz") == relative)
        stored = (self.root / entry.file).read_bytes()
        return gzip.decompress(stored) if entry.storage == "gzip" else stored

    def write_index(self) -> None:
        families: dict[str, int] = {}
        for entry in self.entries:
            families[entry.family] = families.get(entry.family, 0) + 1
        index = {
            "generator": "scripts/make_hostile_corpus.py",
            "keys": {"dir": "keys", "kid": TEST_KID, "key_encryption_key": TEST_KEK, "test_only": True},
            "families": families,
            "entries": [asdict(e) for e in self.entries],
            "controls": [asdict(e) for e in self.controls],
        }
        lines = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in index.items() if key not in LISTS]
        for key in LISTS:
            rows = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in index[key])  # one entry a line
            lines.append(f"{json.dumps(key)}: [\n  {rows}\n]")
        (self.root / "index.json").write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


# -------------------------------------------------------------------------- DICOM encoding


def element(tag: int, vr: str, value: bytes, *, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 7.1.2); ``length`` overrides the real one."""
    n = len(value) if length is None else length
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), n) + value


def implicit_element(tag: int, value: bytes, *, length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, n) + value


def item(value: bytes, *, length: int | None = None) -> bytes:
    return struct.pack("<HHI", *_ITEM, len(value) if length is None else length) + value


ITEM_END: Final = struct.pack("<HHI", *_ITEM_DELIMITER, 0)
SEQUENCE_END: Final = struct.pack("<HHI", *_SEQUENCE_DELIMITER, 0)


def uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" * (len(raw) % 2)


def meta(transfer_syntax: str, sop_class: str, sop_instance: str, *, group_length: int | None = None) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1), written by hand so that any
    Transfer Syntax UID, valid or not, can be declared."""
    body = b"".join(
        [
            element(0x00020001, "OB", b"\x00\x01"),
            element(0x00020002, "UI", uid_value(sop_class)),
            element(0x00020003, "UI", uid_value(sop_instance)),
            element(0x00020010, "UI", uid_value(transfer_syntax)),
            element(0x00020012, "UI", uid_value("1.2.826.0.1.3680043.8.498.1")),
        ]
    )
    n = len(body) if group_length is None else group_length
    return b"\0" * 128 + b"DICM" + element(0x00020000, "UL", struct.pack("<I", n)) + body


def phantom(seed: int = 7, rows: int = 64, **kwargs: Any) -> Dataset:
    return phantom_dataset(seed=seed, positive=True, rows=rows, **kwargs)


def encode_dataset(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The dataset's elements (no File Meta), as pydicom writes them."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def header_and_pixels(ds: Dataset, *, implicit: bool = False) -> tuple[bytes, bytes]:
    """(every element before PixelData, the PixelData element) as encoded bytes."""
    head = copy.deepcopy(ds)
    rest = Dataset()
    rest.add(head["PixelData"])
    del head.PixelData
    return encode_dataset(head, implicit=implicit), encode_dataset(rest, implicit=implicit)


def instance(
    ds: Dataset,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    between: bytes = b"",
    pixels: bytes | None = None,
    implicit: bool = False,
) -> bytes:
    """A Part 10 file from a phantom dataset: meta, header, ``between`` (crafted elements that
    sort before PixelData), then ``pixels`` (the PixelData element, or the phantom's own)."""
    head, own_pixels = header_and_pixels(ds, implicit=implicit)
    return (
        meta(transfer_syntax, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        + head
        + between
        + (own_pixels if pixels is None else pixels)
    )


def encapsulated(fragments: list[bytes], offsets: bytes = b"") -> bytes:
    """Encapsulated PixelData (PS3.5 A.4): Basic Offset Table item, one item per fragment."""
    body = item(offsets) + b"".join(item(f + b"\0" * (len(f) % 2)) for f in fragments) + SEQUENCE_END
    return element(_PIXEL_DATA, "OB", body, length=UNDEFINED)


def compressed_phantom(transfer_syntax: UID, rows: int = 64) -> Dataset:
    ds = phantom(rows=rows, transfer_syntax=transfer_syntax)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def codestream(ds: Dataset) -> bytes:
    """The one frame of a compressed phantom's PixelData."""
    from pydicom.encaps import get_frame  # noqa: PLC0415 - only the DICOM family needs it

    return get_frame(ds.PixelData, 0, number_of_frames=1)


def with_fragment(ds: Dataset, fragment: bytes) -> bytes:
    return instance(ds, transfer_syntax=str(ds.file_meta.TransferSyntaxUID), pixels=encapsulated([fragment]))


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def set_attrs(ds: Dataset, **values: Any) -> Dataset:
    out = copy.deepcopy(ds)
    for keyword, value in values.items():
        setattr(out, keyword, value)
    return out


def raw_override(ds: Dataset, tag: int, vr: str, value: bytes) -> bytes:
    """The phantom with one header element's bytes replaced (values pydicom would not write)."""
    head, pixels = header_and_pixels(ds)
    encoded = element(tag, vr, value)
    pos = _find_element(head, tag)
    old_len = _element_size(head, pos)
    head = head[:pos] + encoded + head[pos + old_len :]
    return meta(ExplicitVRLittleEndian, str(ds.SOPClassUID), str(ds.SOPInstanceUID)) + head + pixels


def _find_element(data: bytes, tag: int) -> int:
    pos = 0
    while pos < len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if (group << 16 | elem) == tag:
            return pos
        pos += _element_size(data, pos)
    raise KeyError(hex(tag))


def _element_size(data: bytes, pos: int) -> int:
    vr = data[pos + 4 : pos + 6].decode()
    if vr in _LONG_VRS:
        return 12 + int(struct.unpack_from("<I", data, pos + 8)[0])
    return 8 + int(struct.unpack_from("<H", data, pos + 6)[0])


# ------------------------------------------------------------------------------ DICOM family


def dicom_family(corpus: Corpus, refused_locally: Callable[[bytes], bool]) -> None:  # noqa: PLR0915 - a flat list
    def add(name: str, body: bytes, expect: Iterable[int], note: str, **kwargs: Any) -> None:
        corpus.add("dicom", name, body, endpoint=CXR, content_type=DICOM, expect=expect, note=note, **kwargs)

    base_ds = phantom()
    base = instance(base_ds)
    sop = (str(base_ds.SOPClassUID), str(base_ds.SOPInstanceUID))
    head, pixels = header_and_pixels(base_ds)
    meta_len = len(meta(ExplicitVRLittleEndian, *sop))
    rg1_path = get_testdata_file("RG1_UNCR.dcm", download=False)
    if rg1_path is None:
        raise SystemExit("pydicom-data's RG1_UNCR.dcm is not installed (download=False)")
    rg1 = Path(str(rg1_path)).read_bytes()

    # -- not DICOM, truncated
    add("empty.dcm", b"", [400], "an empty body")
    add("png-signature.dcm", b"\x89PNG\r\n\x1a\n" + det_bytes("png", 600), [400], "a PNG header, not DICOM")
    add("preamble-only.dcm", b"\0" * 128 + b"DICM", [400], "preamble and DICM, no File Meta Information")
    add("preamble-no-dicm.dcm", b"\0" * 128 + b"DICX" + base[132:], [400], "the DICM prefix is wrong")
    for cut in (132, 200, 1024, 4096, 65536):
        add(f"rg1-truncated-at-{cut}.dcm", rg1[:cut], [400], f"real RG1_UNCR.dcm chest CR cut after {cut} bytes")
    add("truncated-in-meta.dcm", base[: meta_len - 7], [400], "cut inside the File Meta Information")
    add("truncated-in-header.dcm", base[: meta_len + 3], [400], "cut inside the first element header")
    add("truncated-mid-header.dcm", base[: meta_len + len(head) // 2], [400], "cut in the middle of the header")
    add("truncated-half-pixels.dcm", base[: len(base) - len(pixels) // 2], [400], "PixelData cut in half")
    add("truncated-minus-1.dcm", base[:-1], [400], "the last byte is missing")

    # -- bit flips: structural damage anywhere in the meta and header
    kept = 0
    attempt = 0
    while kept < BIT_FLIP_MUTANTS:
        label = f"bitflip-{attempt}"
        attempt += 1
        span = meta_len + len(head)
        mutated = bytearray(base)
        for k in range(1 + det_int(label + "-n", 6)):
            pos = 128 + det_int(f"{label}-pos-{k}", span - 128)
            mutated[pos] ^= 1 << det_int(f"{label}-bit-{k}", 8)
        if refused_locally(bytes(mutated)):
            add(f"{label}.dcm", bytes(mutated), DICOM_REFUSALS, "1-6 bits flipped in the meta or header")
            kept += 1
    random_dataset = meta(ExplicitVRLittleEndian, *sop) + det_bytes("garbage-dataset", 8192)
    add("random-dataset.dcm", random_dataset, [400], "valid File Meta Information, then 8 KiB of random bytes")

    # -- huge declared lengths (0xFFFFFFF0) in every kind of place
    def huge(name: str, data: bytes, note: str, expect: Iterable[int] = (400,)) -> None:
        add(name, data, expect, note + f" declares length 0x{HUGE_LENGTH:08X}")

    pixel_pos = meta_len + len(head)
    huge("len-huge-pixeldata.dcm", patch(base, pixel_pos + 8, struct.pack("<I", HUGE_LENGTH)), "PixelData (OW)")
    comments = _find_element(head, 0x00204000)
    ut = element(0x00204000, "UT", b"", length=HUGE_LENGTH)
    huge(
        "len-huge-ut.dcm",
        meta(ExplicitVRLittleEndian, *sop) + head[:comments] + ut + head[comments:] + pixels,
        "an ImageComments (UT) element",
    )
    huge(
        "len-huge-meta-element.dcm",
        b"\0" * 128 + b"DICM" + element(0x00020001, "OB", b"\x00\x01", length=HUGE_LENGTH) + base[meta_len:],
        "FileMetaInformationVersion (OB)",
    )
    huge(
        "len-huge-sequence.dcm",
        instance(base_ds, between=element(_CONTENT_SEQUENCE, "SQ", item(b""), length=HUGE_LENGTH)),
        "a defined-length sequence",
    )
    huge(
        "len-huge-item.dcm",
        instance(
            base_ds,
            between=element(_CONTENT_SEQUENCE, "SQ", item(b"", length=HUGE_LENGTH) + SEQUENCE_END, length=UNDEFINED),
        ),
        "an item in an undefined-length sequence",
    )
    implicit_head, implicit_pixels = header_and_pixels(base_ds, implicit=True)
    implicit_base = meta(ImplicitVRLittleEndian, *sop) + implicit_head + implicit_pixels
    implicit_pos = len(meta(ImplicitVRLittleEndian, *sop)) + len(implicit_head)
    huge(
        "len-huge-implicit-pixeldata.dcm",
        patch(implicit_base, implicit_pos + 4, struct.pack("<I", HUGE_LENGTH)),
        "Implicit VR: PixelData",
    )
    huge(
        "len-huge-implicit-sequence.dcm",
        meta(ImplicitVRLittleEndian, *sop)
        + implicit_head
        + implicit_element(_CONTENT_SEQUENCE, item(b""), length=HUGE_LENGTH)
        + implicit_pixels,
        "Implicit VR: ContentSequence",
    )
    jls = compressed_phantom(JPEGLSLossless)
    jls_stream = codestream(jls)
    jls_syntax = str(jls.file_meta.TransferSyntaxUID)
    fragment_pixels = element(_PIXEL_DATA, "OB", item(b"") + item(jls_stream, length=HUGE_LENGTH), length=UNDEFINED)
    huge(
        "len-huge-fragment.dcm",
        instance(jls, transfer_syntax=jls_syntax, pixels=fragment_pixels),
        "a JPEG-LS fragment item",
    )
    huge(
        "len-huge-offset-table.dcm",
        instance(
            jls,
            transfer_syntax=jls_syntax,
            pixels=element(_PIXEL_DATA, "OB", item(b"", length=HUGE_LENGTH) + item(jls_stream), length=UNDEFINED),
        ),
        "the Basic Offset Table item",
    )
    add(
        "odd-length-us.dcm",
        raw_override(base_ds, 0x00280010, "US", b"\x40\x00\x00"),
        [400],
        "Rows (US) with a length of 3",
    )

    # -- nesting: deep, recursive (the same item inside itself), and wide
    def nested_undefined(depth: int) -> bytes:
        opening = element(_CONTENT_SEQUENCE, "SQ", b"", length=UNDEFINED) + item(b"", length=UNDEFINED)
        return opening * depth + (ITEM_END + SEQUENCE_END) * depth

    def nested_defined(depth: int) -> bytes:
        inner = b""
        for _ in range(depth):
            inner = element(_CONTENT_SEQUENCE, "SQ", item(inner))
        return inner

    add(
        "sq-undefined-nested-10000.dcm",
        instance(base_ds, between=nested_undefined(10_000)),
        [400, 413],
        "undefined-length sequences nested 10,000 deep",
    )
    add(
        "sq-defined-nested-10000.dcm",
        instance(base_ds, between=nested_defined(10_000)),
        [400, 413],
        "defined-length sequences nested 10,000 deep",
    )
    add(
        "sq-defined-nested-17.dcm",
        instance(base_ds, between=nested_defined(17)),
        [400],
        "defined-length sequences nested 17 deep (the cap is 16)",
    )
    add(
        "sq-unclosed-nested-5000.dcm",
        instance(base_ds, between=element(_CONTENT_SEQUENCE, "SQ", b"", length=UNDEFINED) * 5000),
        [400, 413],
        "5,000 undefined-length sequences opened, none closed",
    )
    add(
        "sq-item-outside-sequence.dcm",
        instance(base_ds, between=item(b"", length=UNDEFINED) * 1000),
        [400, 413],
        "1,000 undefined-length items with no sequence around them",
    )
    add(
        "sq-wide-2m-items.dcm",
        instance(base_ds, between=element(_CONTENT_SEQUENCE, "SQ", item(b"") * 1_900_000, length=UNDEFINED)),
        [400, 413],
        "one sequence of 1.9 million empty items (15 MiB)",
    )
    add(
        "sq-element-bomb.dcm",
        instance(base_ds, between=element(_CONTENT_SEQUENCE, "SQ", _items_of_elements(1_900_000), length=UNDEFINED)),
        [400, 413],
        "1,900 items of 1,000 empty elements each (15 MiB)",
    )
    add(
        "sq-element-bomb-defined.dcm",
        instance(base_ds, between=element(_CONTENT_SEQUENCE, "SQ", _items_of_elements(1_900_000))),
        [400, 413],
        "the same, in a defined-length sequence (parsed lazily)",
    )
    add(
        "top-level-element-bomb.dcm",
        meta(ExplicitVRLittleEndian, *sop) + _tiny_elements(300_000) + head + pixels,
        [400, 413],
        "300,000 empty top-level elements (1,000 tags repeated; the cap is 200,000) before the header",
    )

    meta_bomb = element(0x00020200, "SQ", item(b"") * 1_900_000, length=UNDEFINED)
    add(
        "meta-sequence-bomb.dcm",
        meta(ExplicitVRLittleEndian, *sop) + meta_bomb + head + pixels,
        [400, 413],
        "a sequence of 1.9 million items inside the File Meta Information (never deflated)",
    )

    # -- pixel bombs: what the header declares, with a few bytes of pixel data
    def bomb(name: str, note: str, expect: Iterable[int] = (413,), **values: Any) -> None:
        ds = set_attrs(base_ds, **values)
        add(name, instance(ds, pixels=element(_PIXEL_DATA, "OW", b"\0" * 64)), expect, note)

    bomb(
        "pixel-bomb-65535x65535x1000.dcm",
        "65535 x 65535 x 1000 frames x 2 bytes declared",
        Rows=65535,
        Columns=65535,
        NumberOfFrames="1000",
    )
    bomb("pixel-bomb-frames-2e9.dcm", "NumberOfFrames 2147483647", NumberOfFrames="2147483647")
    bomb(
        "pixel-bomb-rgb-64bit.dcm",
        "65535 x 65535 RGB at 64 bits per sample",
        [413, 400],
        Rows=65535,
        Columns=65535,
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        BitsAllocated=64,
        BitsStored=64,
        HighBit=63,
    )
    bomb("pixel-bomb-frames-negative.dcm", "NumberOfFrames -5", [400], NumberOfFrames="-5")
    bomb("pixel-bomb-rows-zero.dcm", "Rows 0", [400], Rows=0)
    add(
        "pixel-bomb-frames-1e400.dcm",
        raw_override(set_attrs(base_ds, NumberOfFrames="1"), 0x00280008, "IS", b"1e400 "),
        [400],
        "NumberOfFrames '1e400' (infinite as a float)",
    )
    add(
        "pixel-bomb-frames-huge-digits.dcm",
        raw_override(set_attrs(base_ds, NumberOfFrames="1"), 0x00280008, "IS", b"9" * 12),
        [400, 413],
        "NumberOfFrames of 12 nines (IS allows 12 characters)",
    )
    add(
        "pixel-bomb-implicit.dcm",
        meta(ImplicitVRLittleEndian, *sop)
        + encode_dataset(set_attrs(base_ds, Rows=65535, Columns=65535, NumberOfFrames="1000"), implicit=True),
        [413],
        "Implicit VR pixel bomb; PixelData only 8 KiB",
    )

    # -- compressed pixel bombs: codestream headers declaring huge images
    jls_sof = jls_stream.index(b"\xff\xf7")
    add(
        "jpegls-sof-65535.dcm",
        with_fragment(jls, patch(jls_stream, jls_sof + 5, struct.pack(">HH", 65535, 65535))),
        [400],
        "JPEG-LS SOF55 declares 65535 x 65535 (DICOM says 64 x 64)",
    )
    add(
        "jpegls-both-65535.dcm",
        instance(
            set_attrs(jls, Rows=65535, Columns=65535),
            transfer_syntax=jls_syntax,
            pixels=encapsulated([patch(jls_stream, jls_sof + 5, struct.pack(">HH", 65535, 65535))]),
        ),
        [413],
        "JPEG-LS and DICOM both declare 65535 x 65535",
    )
    add(
        "jpegls-truncated-scan.dcm",
        with_fragment(jls, jls_stream[: len(jls_stream) // 3]),
        [400],
        "JPEG-LS codestream cut after a third (header matches)",
    )
    add(
        "jpegls-garbage-scan.dcm",
        with_fragment(jls, jls_stream[: jls_sof + 40] + det_bytes("jls-scan", len(jls_stream) - jls_sof - 40)),
        [400],
        "JPEG-LS header followed by random scan data",
    )
    j2k = compressed_phantom(JPEG2000Lossless)
    j2k_stream = codestream(j2k)
    siz = j2k_stream.index(b"\xff\x4f\xff\x51")
    add(
        "j2k-siz-4g.dcm",
        with_fragment(j2k, patch(j2k_stream, siz + 8, struct.pack(">II", 0xFFFFFFFF, 0xFFFFFFFF))),
        [400],
        "JPEG 2000 SIZ declares 4294967295 x 4294967295",
    )
    add(
        "j2k-siz-offset-trick.dcm",
        with_fragment(
            j2k,
            patch(j2k_stream, siz + 8, struct.pack(">IIII", 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF - 64, 0xFFFFFFFF - 64)),
        ),
        [400],
        "JPEG 2000 SIZ at the far end of the reference grid (size minus offset is 64 x 64)",
    )
    add(
        "j2k-tiles-1x1.dcm",
        with_fragment(j2k, patch(j2k_stream, siz + 24, struct.pack(">II", 1, 1))),
        [400],
        "JPEG 2000 with 1 x 1 tiles (4,096 of them) and a codestream for one",
    )
    add(
        "j2k-components-16384.dcm",
        with_fragment(j2k, patch(j2k_stream, siz + 40, struct.pack(">H", 16384))),
        [400],
        "JPEG 2000 SIZ declares 16,384 components",
    )
    add(
        "j2k-truncated.dcm",
        with_fragment(j2k, j2k_stream[: len(j2k_stream) // 2]),
        [400],
        "JPEG 2000 codestream cut in half",
    )
    jpeg = phantom(bits_stored=8)
    jpeg_stream = _jpeg_baseline(jpeg)
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    sof0 = jpeg_stream.index(b"\xff\xc0")
    add(
        "jpeg-sof-65535.dcm",
        with_fragment(jpeg, patch(jpeg_stream, sof0 + 5, struct.pack(">HH", 65535, 65535))),
        [400],
        "JPEG baseline SOF0 declares 65535 x 65535",
    )
    add(
        "jpeg-dnl.dcm",
        with_fragment(jpeg, patch(jpeg_stream, sof0 + 5, struct.pack(">H", 0))),
        [415],
        "JPEG baseline SOF0 with 0 lines (height from a DNL marker)",
    )
    add(
        "jpeg-truncated.dcm",
        with_fragment(jpeg, jpeg_stream[: len(jpeg_stream) // 2]),
        [400],
        "JPEG baseline codestream cut in half (header matches)",
    )
    rle = compressed_phantom(RLELossless)
    rle_stream = codestream(rle)
    add(
        "rle-header-bomb.dcm",
        with_fragment(rle, struct.pack("<16I", 15, *([0xFFFFFFF0] * 15)) + rle_stream[64:]),
        [400],
        "RLE header: 15 segments at offset 0xFFFFFFF0",
    )
    add(
        "rle-runs-overflow.dcm",
        with_fragment(rle, rle_stream[:64] + b"\x81\x00" * 40_000),
        [400],
        "RLE segments whose runs decode to 80 times the frame",
    )
    add(
        "rle-at-pixel-cap-bad-window.dcm",
        _rle_at_cap(base_ds),
        [400],
        "RLE 5792 x 5792 x 16 bit (the 64 MiB pixel cap) from 1 MiB of runs, then WindowWidth 0",
        decodes_pixels=True,
    )
    add(
        "jpegls-at-pixel-cap-bad-window.dcm",
        _jpegls_at_cap(base_ds),
        [400],
        "JPEG-LS 5792 x 5792 x 16 bit (the 64 MiB pixel cap) from a few KiB, then WindowWidth 0",
        decodes_pixels=True,
    )
    add(
        "control-jpegls-at-pixel-cap.dcm",
        _jpegls_at_cap(base_ds, window="4096"),
        [200],
        "the same image with a valid window: the largest legitimate decode at these caps",
        control=True,
        decodes_pixels=True,
    )

    # -- deflate bombs
    def deflated(dataset: bytes, level: int = 9) -> bytes:
        packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        return meta(DeflatedExplicitVRLittleEndian, *sop) + packer.compress(dataset) + packer.flush()

    # -- controls: each decoder once, valid (the harness warms up with them; a payload's cost is
    # then its own, not that of loading a codec library)
    for name, syntax, data in [
        ("control-explicit.dcm", ExplicitVRLittleEndian, base),
        ("control-rle.dcm", RLELossless, with_fragment(rle, rle_stream)),
        ("control-jpegls.dcm", JPEGLSLossless, with_fragment(jls, jls_stream)),
        ("control-j2k.dcm", JPEG2000Lossless, with_fragment(j2k, j2k_stream)),
        ("control-jpeg.dcm", JPEGBaseline8Bit, with_fragment(jpeg, jpeg_stream)),
        ("control-deflated.dcm", DeflatedExplicitVRLittleEndian, deflated(head + pixels)),
    ]:
        add(name, data, [200], f"a valid phantom, {syntax.name}", control=True)

    gib_of_zeros = _deflate_zeros(head + element(_PIXEL_DATA, "OW", b"", length=1 << 30), 1 << 30)
    add(
        "deflate-bomb-1gib.dcm",
        meta(DeflatedExplicitVRLittleEndian, *sop) + gib_of_zeros,
        [413],
        "Deflated Explicit VR: about 1 MiB that inflates to 1 GiB (header, then PixelData of zeros)",
    )
    add(
        "deflate-element-bomb.dcm",
        deflated(head + element(_CONTENT_SEQUENCE, "SQ", _items_of_elements(1_900_000), length=UNDEFINED) + pixels),
        [400, 413],
        "Deflated: a few KiB that inflate to 1.9 million empty elements in 1,900 items (15 MiB)",
    )
    add(
        "deflate-items-bomb.dcm",
        deflated(head + element(_CONTENT_SEQUENCE, "SQ", item(b"") * (1_900_000), length=UNDEFINED) + pixels),
        [400, 413],
        "Deflated: a few KiB that inflate to 1.9 million empty sequence items",
    )
    add(
        "deflate-nested-bomb.dcm",
        deflated(head + nested_undefined(100_000) + pixels),
        [400, 413],
        "Deflated: undefined-length sequences nested 100,000 deep",
    )
    add(
        "deflate-corrupt.dcm",
        meta(DeflatedExplicitVRLittleEndian, *sop) + det_bytes("deflate-garbage", 4096),
        [400],
        "Deflated transfer syntax, random bytes",
    )
    add(
        "deflate-truncated.dcm",
        deflated(head + pixels)[: meta_len + 300],
        [400],
        "Deflated stream cut short",
    )

    # -- encodings and attributes the reader must refuse cleanly
    add(
        "ts-mpeg2.dcm",
        meta("1.2.840.10008.1.2.4.100", *sop) + head + pixels,
        [415],
        "MPEG2 transfer syntax",
    )
    add("ts-not-a-uid.dcm", meta("not.a.uid!", *sop) + head + pixels, [400], "Transfer Syntax UID 'not.a.uid!'")
    add("ts-empty.dcm", meta("", *sop) + head + pixels, [400], "empty Transfer Syntax UID")
    add(
        "ts-multivalued.dcm",
        meta("1.2.840.10008.1.2.1\\1.2.840.10008.1.2", *sop) + head + pixels,
        [400],
        "two Transfer Syntax UIDs",
    )
    add(
        "ts-big-endian-bytes-little.dcm",
        meta("1.2.840.10008.1.2.2", *sop) + head + pixels,
        [400, 415],
        "Explicit VR Big Endian declared, Little Endian bytes",
    )
    add(
        "ts-implicit-bytes-explicit.dcm",
        meta(ImplicitVRLittleEndian, *sop) + head + pixels,
        [400, 415],
        "Implicit VR declared, Explicit VR bytes",
    )
    add(
        "bits-allocated-7.dcm",
        instance(set_attrs(base_ds, BitsAllocated=7)),
        [400],
        "BitsAllocated 7",
    )
    add(
        "bits-stored-over-allocated.dcm",
        instance(set_attrs(base_ds, BitsStored=40, HighBit=39)),
        [400],
        "BitsStored 40 with BitsAllocated 16",
    )
    add("high-bit-wrong.dcm", instance(set_attrs(base_ds, HighBit=3)), [415], "HighBit 3 with BitsStored 12")
    add(
        "photometric-unknown.dcm",
        instance(set_attrs(base_ds, PhotometricInterpretation="HSV")),
        [415],
        "PhotometricInterpretation HSV",
    )
    add(
        "samples-mismatch.dcm",
        instance(set_attrs(base_ds, SamplesPerPixel=3)),
        [400],
        "SamplesPerPixel 3 for MONOCHROME2",
    )
    add(
        "window-nan.dcm",
        raw_override(base_ds, 0x00281051, "DS", b"NaN "),
        [400],
        "WindowWidth NaN",
    )
    add(
        "rescale-inf.dcm",
        raw_override(base_ds, 0x00281053, "DS", b"1e999 "),
        [400],
        "RescaleSlope 1e999",
    )
    add(
        "sop-uid-mismatch.dcm",
        meta(ExplicitVRLittleEndian, sop[0], "1.2.3.4") + head + pixels,
        [400],
        "SOPInstanceUID differs from the File Meta Information's",
    )
    add(
        "voi-lut-bomb.dcm",
        instance(set_attrs(base_ds, VOILUTFunction="", WindowCenter=None, WindowWidth=None), between=_voi_lut(base_ds)),
        [400],
        "VOI LUT Sequence: LUTDescriptor declares 65536 entries at 0 bits",
    )


def _jpeg_baseline(ds: Dataset) -> bytes:
    """The phantom's 8-bit pixels as a baseline JPEG (Pillow; pydicom 3.0 has no JPEG encoder)."""
    from PIL import Image  # noqa: PLC0415

    buffer = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


_DISTINCT: Final = 1000


def _tiny_elements(count: int) -> bytes:
    """``count`` empty private LO elements, 8 bytes each: the same 1,000 distinct tags over and
    over (so the file compresses; each repeat is still an element the parser must read)."""
    block = b"".join(struct.pack("<HH2sH", 0x0009, 0x1000 + i, b"LO", 0) for i in range(_DISTINCT))
    return block * (count // _DISTINCT) + block[: 8 * (count % _DISTINCT)]


def _items_of_elements(count: int) -> bytes:
    """``count`` empty elements inside items of 1,000 distinct tags each (pydicom keeps them all)."""
    return item(_tiny_elements(_DISTINCT)) * (count // _DISTINCT)


def _deflate_zeros(prefix: bytes, zeros: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [packer.compress(prefix)]
    block = b"\0" * (16 * MIB)
    for _ in range(zeros // len(block)):
        out.append(packer.compress(block))
    out.append(packer.flush())
    return b"".join(out)


_CAP_SIDE: Final = 5792  # 5792 * 5792 * 2 bytes is just under 64 MiB


def _at_cap(base_ds: Dataset, window: str) -> Dataset:
    return set_attrs(base_ds, Rows=_CAP_SIDE, Columns=_CAP_SIDE, WindowWidth=window, WindowCenter="2048")


def _rle_at_cap(base_ds: Dataset) -> bytes:
    """A constant 16-bit image at the pixel cap as RLE (PS3.5 G.3): each row of each byte plane
    as 45 runs of 128 and one of 32, so 1 MiB of runs decodes to 64 MiB."""
    row = b"\x81\x08" * (_CAP_SIDE // 128) + bytes([257 - (_CAP_SIDE % 128), 0x08])
    segment = row * _CAP_SIDE
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds = _at_cap(base_ds, "0")
    return instance(ds, transfer_syntax=RLELossless, pixels=encapsulated([header + segment + segment]))


def _jpegls_at_cap(base_ds: Dataset, window: str = "0") -> bytes:
    from jpeg_ls import encode_array  # type: ignore[import-untyped]  # noqa: PLC0415 - pyjpegls, this payload only

    image = np.full((_CAP_SIDE, _CAP_SIDE), 2056, dtype=np.uint16)
    stream = bytes(encode_array(image, lossy_error=0))
    ds = _at_cap(base_ds, window)
    return instance(ds, transfer_syntax=JPEGLSLossless, pixels=encapsulated([stream]))


def _voi_lut(base_ds: Dataset) -> bytes:
    lut = element(0x00283002, "US", struct.pack("<HHH", 0, 0, 0)) + element(0x00283006, "OW", b"\0\0")
    return element(0x00283010, "SQ", item(lut))


# ---------------------------------------------------------------------------------- the key


def test_private_key() -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(det_bytes("hostile-test-key", 32), "big") % (2**256 - 2**224 - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _coordinates(public: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = public.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }


def write_test_keys(root: Path) -> None:
    """``keys/<kid>.key.json`` exactly as :class:`app.security.keystore.KeyStore` writes one."""
    private = test_private_key()
    jwk = _coordinates(private.public_key()) | {
        "d": b64(private.private_numbers().private_value.to_bytes(32, "big")),
        "kid": TEST_KID,
    }
    kek = hashlib.sha256(b"medinfer-kek:" + TEST_KEK.encode()).digest()
    protected = b64(json.dumps({"alg": "dir", "enc": "A256GCM", "cty": "jwk+json"}).encode())
    iv = det_bytes("keystore-iv", 12)
    sealed = AESGCM(kek).encrypt(iv, json.dumps(jwk).encode(), protected.encode("ascii"))
    record = {
        "kid": TEST_KID,
        "alg": "ECDH-ES+A256KW",
        "state": "active",
        "created": TEST_KEY_CREATED,
        "retire_until": None,
        "sealed": f"{protected}..{b64(iv)}.{b64(sealed[:-16])}.{b64(sealed[-16:])}",
    }
    (root / "keys").mkdir(parents=True, exist_ok=True)
    (root / "keys" / f"{TEST_KID}.key.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------------- JWE build


def _concat_kdf(shared: bytes, alg: str) -> bytes:
    """RFC 7518 4.6.2: Concat KDF with SHA-256, AlgorithmID = alg, empty apu/apv, 256 bits."""

    def length_prefixed(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    other = length_prefixed(alg.encode()) + length_prefixed(b"") + length_prefixed(b"") + struct.pack(">I", 256)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"\x00\x00\x00\x01" + shared + other)
    return digest.finalize()


@dataclass
class Jwe:
    """The five parts of a JWE, before serialisation, so each can be mutated."""

    header: dict[str, Any]
    protected: str
    encrypted_key: str
    iv: str
    ciphertext: str
    tag: str

    def compact(self) -> bytes:
        return ".".join([self.protected, self.encrypted_key, self.iv, self.ciphertext, self.tag]).encode()

    def flattened(self, **extra: Any) -> dict[str, Any]:
        return {
            "protected": self.protected,
            "encrypted_key": self.encrypted_key,
            "iv": self.iv,
            "ciphertext": self.ciphertext,
            "tag": self.tag,
        } | extra


def encrypt(
    label: str,
    plaintext: bytes,
    *,
    cty: str,
    header: dict[str, Any] | None = None,
    protected_override: str | None = None,
) -> Jwe:
    """ECDH-ES+A256KW + A256GCM to the test key, with seeded ephemeral key, CEK and IV.

    ``header`` entries are merged into (or, as None, removed from) the protected header, and
    are authenticated: a JWE with ``zip`` here is a genuine zip JWE that would decrypt.
    """
    recipient = test_private_key().public_key()
    ephemeral = ec.derive_private_key(int.from_bytes(det_bytes(label + "-epk", 31), "big") + 1, ec.SECP256R1())
    kek = _concat_kdf(ephemeral.exchange(ec.ECDH(), recipient), "ECDH-ES+A256KW")
    cek = det_bytes(label + "-cek", 32)
    iv = det_bytes(label + "-iv", 12)
    fields: dict[str, Any] = {
        "alg": "ECDH-ES+A256KW",
        "enc": "A256GCM",
        "kid": TEST_KID,
        "cty": cty,
        "epk": _coordinates(ephemeral.public_key()),
    }
    for key, value in (header or {}).items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    protected = protected_override or b64(json.dumps(fields, separators=(",", ":")).encode())
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return Jwe(
        header=fields,
        protected=protected,
        encrypted_key=b64(aes_key_wrap(kek, cek)),
        iv=b64(iv),
        ciphertext=b64(sealed[:-16]),
        tag=b64(sealed[-16:]),
    )


def flip_b64(segment: str, label: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not raw:
        return b64(b"\x01")
    raw[det_int(label, len(raw))] ^= 1 << det_int(label + "-bit", 8)
    return b64(bytes(raw))


def valid_bundle() -> dict[str, Any]:
    """A Bundle the ehr-heart-disease model answers 200 for (the required age, sex and cp)."""
    site = "urn:medinfer:codesystem:uci-heart-disease"
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "fullUrl": "urn:uuid:0b7c2a3e-0f3d-4c55-9b8e-0b1b5e9f0a01",
                "resource": {
                    "resourceType": "Patient",
                    "id": "p1",
                    "identifier": [{"system": "urn:oid:1.2.3.4", "value": "HOSTILE-0001"}],
                    "gender": "male",
                    "birthDate": "1961-04-02",
                },
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": "cp",
                    "status": "final",
                    "code": {"coding": [{"system": site, "code": "chest-pain-type"}]},
                    "subject": {"reference": "Patient/p1"},
                    "effectiveDateTime": "2024-05-01T09:30:00Z",
                    "valueCodeableConcept": {"coding": [{"system": site, "code": "typical-angina"}]},
                }
            },
        ],
    }


# ------------------------------------------------------------------------------- JWE family


def jwe_family(corpus: Corpus) -> None:  # noqa: PLR0915 - a flat list
    bundle = json.dumps(valid_bundle()).encode()

    def add(
        name: str,
        body: bytes,
        note: str,
        *,
        expect: Iterable[int] = (400,),
        json_form: bool = False,
        endpoint: str = EHR,
    ) -> None:
        corpus.add(
            "jwe",
            name,
            body,
            endpoint=endpoint,
            content_type=JOSE_JSON if json_form else JOSE,
            expect=expect,
            note=note,
        )

    def add_json(name: str, document: Any, note: str, **kwargs: Any) -> None:
        add(name, json.dumps(document).encode(), note, json_form=True, **kwargs)

    good = encrypt("good", bundle, cty=FHIR)
    corpus.add(
        "jwe",
        "control-compact.jose",
        good.compact(),
        endpoint=EHR,
        content_type=JOSE,
        expect=[200],
        note="valid compact JWE of a valid Bundle",
        control=True,
    )
    corpus.add(
        "jwe",
        "control-json.json",
        json.dumps(good.flattened()).encode(),
        endpoint=EHR,
        content_type=JOSE_JSON,
        expect=[200],
        note="valid flattened JSON JWE of a valid Bundle",
        control=True,
    )

    # -- every field of the compact serialisation, bit-flipped, emptied, or garbage
    parts = ["protected", "encrypted_key", "iv", "ciphertext", "tag"]
    for part in parts:
        for how in ("flip", "empty", "garbage", "not-base64"):
            mutated = copy.copy(good)
            value = getattr(good, part)
            new = {
                "flip": flip_b64(value, f"{part}-{how}"),
                "empty": "",
                "garbage": b64(det_bytes(f"{part}-garbage", max(1, len(value) * 3 // 4))),
                "not-base64": "!!*&^%$#@" * 4,
            }[how]
            setattr(mutated, part, new)
            add(f"compact-{part}-{how}.jose", mutated.compact(), f"compact: {part} {how}")
            add_json(f"json-{part}-{how}.json", mutated.flattened(), f"flattened JSON: {part} {how}")
    add("compact-six-parts.jose", good.compact() + b".AAAA", "compact with six parts")
    add("compact-four-parts.jose", good.compact().rsplit(b".", 1)[0], "compact with four parts")
    add("compact-non-ascii.jose", good.compact().replace(b".", "\u2024".encode(), 1), "a non-ASCII separator")
    add("compact-nul.jose", good.compact() + b"\0", "a trailing NUL")
    add("compact-whitespace.jose", b"\n  ".join(good.compact().split(b".")), "whitespace inside the parts")
    add("compact-empty.jose", b"", "an empty body")
    add("compact-dots.jose", b"....", "five empty parts")
    iv_long = copy.copy(good)
    iv_long.iv = b64(det_bytes("long-iv", 1 << 13))
    add("compact-iv-8k.jose", iv_long.compact(), "an 8 KiB IV")
    short_tag = copy.copy(good)
    short_tag.tag = good.tag[:2]
    add("compact-tag-1-byte.jose", short_tag.compact(), "a one-byte tag")

    # -- headers: alg, enc, kid, zip, crit, cty, epk, types, sizes
    def header_case(name: str, note: str, plaintext: bytes = bundle, **header: Any) -> None:
        """A genuine JWE whose protected header has ``header`` merged in (None removes a field)."""
        jwe = encrypt(name, plaintext, cty=FHIR, header=header)
        add(f"header-{name}.jose", jwe.compact(), note)
        add_json(f"header-{name}.json", jwe.flattened(), note + " (JSON)")

    for alg in ("none", "dir", "A256KW", "RSA1_5", "PBES2-HS512+A256KW", "ECDH-ES", "RSA-OAEP-256", "ecdh-es+a256kw"):
        header_case(f"alg-{alg.lower().replace('+', '-')}", f"alg {alg}", alg=alg, p2c=2**31 - 1)
    for enc in ("A128CBC-HS256", "A128GCM", "A256CBC-HS512", "none", "a256gcm"):
        header_case(f"enc-{enc.lower()}", f"enc {enc}", enc=enc)
    header_case("kid-unknown", "a kid the service does not hold", kid="no-such-key")
    header_case("kid-missing", "no kid", kid=None)
    header_case("kid-huge", "a 6 KiB kid", kid="k" * 6000)
    header_case("crit", "crit names an extension", crit=["exp"], exp=1)
    header_case("crit-empty", "an empty crit list", crit=[])
    header_case("cty-unknown", "cty application/x-unknown", cty="application/x-unknown")
    header_case("cty-missing", "no cty", cty=None)
    header_case("alg-list", "alg is a list", alg=["ECDH-ES+A256KW"])
    header_case("alg-object", "alg is an object", alg={"name": "ECDH-ES+A256KW"})
    header_case("enc-list", "enc is a list", enc=["A256GCM"])
    header_case("alg-number", "alg is a number", alg=0)
    header_case("cty-object", "cty is an object", cty={"type": FHIR})
    header_case("kid-object", "kid is an object", kid={"kid": TEST_KID})
    header_case("epk-missing", "no epk", epk=None)
    header_case("epk-string", "epk is a string", epk="not-a-key")
    header_case(
        "epk-off-curve",
        "epk is not on the curve",
        epk={"kty": "EC", "crv": "P-256", "x": b64(b"\1" * 32), "y": b64(b"\2" * 32)},
    )
    header_case("epk-p521", "epk on P-521 for a P-256 key", epk=_coordinates_p521())
    header_case("epk-rsa", "epk is an RSA key", epk={"kty": "RSA", "n": b64(b"\xff" * 256), "e": "AQAB"})
    header_case("epk-oct", "epk is a symmetric key", epk={"kty": "oct", "k": b64(b"\0" * 32)})
    header_case(
        "epk-private",
        "epk carries a private key",
        epk=_coordinates(test_private_key().public_key()) | {"d": b64(b"\1" * 32)},
    )
    header_case("apu-huge", "a 6 KiB apu", apu=b64(b"u" * 4000))

    # zip: DEF, a genuine deflate bomb inside: 16 MiB of zeros deflated and encrypted
    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = bomb.compress(b"\0" * (16 * MIB)) + bomb.flush()
    header_case("zip-def-bomb", "zip DEF: 16 KiB that inflate to 16 MiB", plaintext=deflated, zip="DEF")
    header_case("zip-unknown", "zip XYZ", zip="XYZ")
    zip_jwe = encrypt("zip-unprotected", deflated, cty=FHIR)
    add_json(
        "json-zip-unprotected.json",
        zip_jwe.flattened(unprotected={"zip": "DEF"}),
        "zip DEF in the shared unprotected header",
    )
    add_json(
        "json-zip-recipient.json",
        {k: v for k, v in zip_jwe.flattened().items() if k != "encrypted_key"}
        | {"recipients": [{"encrypted_key": zip_jwe.encrypted_key, "header": {"zip": "DEF"}}]},
        "zip DEF in the per-recipient header",
    )

    # -- huge and hostile protected headers
    big = b64(json.dumps({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "pad": "x" * (1 * MIB)}).encode())
    huge_header = copy.copy(good)
    huge_header.protected = big
    add("header-1mib.jose", huge_header.compact(), "a 1 MiB protected header")
    add_json("header-1mib.json", huge_header.flattened(), "a 1 MiB protected header (JSON)")
    at_limit = b64(json.dumps({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "pad": "x" * 6000}).encode())
    near = copy.copy(good)
    near.protected = at_limit[:8192]
    add("header-8k-cut.jose", near.compact(), "a protected header at the 8 KiB limit, cut mid-JSON")
    nested = b64(b"[" * 6000)
    deep = copy.copy(good)
    deep.protected = nested
    add("header-deep-array.jose", deep.compact(), "protected header: 6,000 nested arrays (under 8 KiB)")
    add_json("header-deep-array.json", deep.flattened(), "protected header: 6,000 nested arrays (JSON)")
    deep_object = copy.copy(good)
    deep_object.protected = b64(b'{"a":' * 1200 + b"1" + b"}" * 1200)
    add("header-deep-object.jose", deep_object.compact(), "protected header: 1,200 nested objects")
    for name, raw in {
        "array": b"[]",
        "string": b'"alg"',
        "number": b"1" * 5000,
        "null": b"null",
        "not-json": b"{alg:ECDH-ES+A256KW}",
        "latin1": '{"alg":"\u00e9"}'.encode("latin-1"),
        "duplicate-alg": b'{"alg":"none","alg":"ECDH-ES+A256KW","enc":"A256GCM"}',
        "lone-surrogate": b'{"alg":"ECDH-ES+A256KW","enc":"A256GCM","kid":"\\ud800"}',
    }.items():
        odd = copy.copy(good)
        odd.protected = b64(raw)
        add(f"header-{name}.jose", odd.compact(), f"protected header: {name}")
        add_json(f"header-{name}.json", odd.flattened(), f"protected header: {name} (JSON)")

    # -- the JSON serialisation's own structure
    flat = good.flattened()
    add_json(
        "json-general-2-recipients.json",
        {k: v for k, v in flat.items() if k != "encrypted_key"}
        | {"recipients": [{"encrypted_key": good.encrypted_key}] * 2},
        "two recipients",
    )
    add_json("json-recipients-empty.json", flat | {"recipients": []}, "an empty recipients list")
    add_json("json-recipients-object.json", flat | {"recipients": {"a": 1}}, "recipients is an object")
    add_json(
        "json-recipient-header-list.json",
        {k: v for k, v in flat.items() if k != "encrypted_key"}
        | {"recipients": [{"encrypted_key": good.encrypted_key, "header": ["zip"]}]},
        "a recipient header that is a list",
    )
    add_json("json-aad.json", flat | {"aad": b64(b"extra")}, "with aad")
    add_json("json-protected-number.json", flat | {"protected": 12345}, "protected is a number")
    add_json("json-protected-missing.json", {k: v for k, v in flat.items() if k != "protected"}, "no protected")
    add_json("json-unprotected-list.json", flat | {"unprotected": ["alg"]}, "unprotected is a list")
    add_json("json-unprotected-alg.json", flat | {"unprotected": {"alg": "dir"}}, "alg repeated, unprotected")
    add_json("json-fields-numbers.json", dict.fromkeys(flat, 7), "every field a number")
    add_json("json-array.json", [flat], "a JSON array around the JWE")
    add_json("json-string.json", good.compact().decode(), "the compact form as a JSON string")
    add("json-deep.json", b"[" * 100_000 + b"]" * 100_000, "100,000 nested arrays", json_form=True)
    add(
        "json-deep-object.json",
        b'{"recipients":' * 50_000 + b"1" + b"}" * 50_000,
        "50,000 nested objects",
        json_form=True,
    )
    add("json-not-json.json", b"{" + det_bytes("json-garbage", 1000), "not JSON", json_form=True)
    add("json-huge-number.json", b'{"protected":' + b"9" * 5000 + b"}", "a 5,000-digit number", json_form=True)
    add("json-compact-body.json", good.compact(), "a compact JWE sent as application/jose+json", json_form=True)
    add("compact-json-body.jose", json.dumps(flat).encode(), "a JSON JWE sent as application/jose")

    # -- valid encryption, hostile plaintext: the inner payload takes the ordinary path
    def inner(
        name: str, plaintext: bytes, cty: str, note: str, *, endpoint: str = EHR, expect: Iterable[int] = (400,)
    ) -> None:
        add(
            f"inner-{name}.jose",
            encrypt(f"inner-{name}", plaintext, cty=cty).compact(),
            note,
            endpoint=endpoint,
            expect=expect,
        )

    inner("fhir-deep", _deep_fhir(10_000), FHIR, "a 10,000-level FHIR nesting inside a valid JWE", expect=[400, 413])
    inner("fhir-not-json", b"\xff\xfe not json", FHIR, "plaintext is not JSON")
    inner("dicom-pixel-bomb", _pixel_bomb(), DICOM, "a DICOM pixel bomb inside a valid JWE", endpoint=CXR, expect=[413])
    inner("dicom-truncated", instance(phantom())[:700], DICOM, "a truncated DICOM inside", endpoint=CXR)
    inner(
        "multipart-no-boundary",
        b"--x\r\n\r\n--x--\r\n",
        "multipart/related",
        "cty multipart/related without a boundary",
        endpoint=CXR,
    )
    inner(
        "nested-jose",
        good.compact(),
        JOSE,
        "cty application/jose (a nested JWE, for a client without a signing key)",
        expect=[401],
    )
    inner("jwt-garbage", b"a.b.c", "jwt", "cty jwt with a garbage token", expect=[401])
    inner("text-plain", b"hello", "text/plain; charset=utf-8", "cty text/plain", expect=[400])
    inner("empty", b"", FHIR, "an empty plaintext")


def _coordinates_p521() -> dict[str, str]:
    key = ec.derive_private_key(12345, ec.SECP521R1()).public_key().public_numbers()
    return {"kty": "EC", "crv": "P-521", "x": b64(key.x.to_bytes(66, "big")), "y": b64(key.y.to_bytes(66, "big"))}


def _pixel_bomb() -> bytes:
    ds = set_attrs(phantom(), Rows=65535, Columns=65535, NumberOfFrames="1000")
    return instance(ds, pixels=element(_PIXEL_DATA, "OW", b"\0" * 64))


def _deep_fhir(depth: int) -> bytes:
    return b'{"resourceType":"Bundle","type":"collection","entry":' + b"[" * depth + b"]" * depth + b"}"


# ------------------------------------------------------------------------------ FHIR family


def fhir_family(corpus: Corpus) -> None:
    def add(name: str, body: bytes, expect: Iterable[int], note: str, content_type: str = FHIR) -> None:
        corpus.add("fhir", name, body, endpoint=EHR, content_type=content_type, expect=expect, note=note)

    good = valid_bundle()
    corpus.add(
        "fhir",
        "control-bundle.json",
        json.dumps(good).encode(),
        endpoint=EHR,
        content_type=FHIR,
        expect=[200],
        note="a valid Bundle",
        control=True,
    )

    def variant(change: Callable[[dict[str, Any]], Any]) -> bytes:
        doc = copy.deepcopy(good)
        change(doc)  # in place
        return json.dumps(doc, allow_nan=True).encode()

    # -- depth
    add("deep-array-10000.json", _deep_fhir(10_000), [400, 413], "entry: 10,000 nested arrays")
    add("deep-object-10000.json", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, [400, 413], "10,000 nested objects")
    extension = b'{"url":"urn:x","extension":[' * 10_000 + b"]}" * 10_000
    add(
        "deep-extension-10000.json",
        variant(lambda d: d["entry"][0]["resource"].update(extension="@@EXT@@")).replace(
            b'"@@EXT@@"', b"[" + extension + b"]"
        ),
        [400, 413],
        "Patient.extension nested 10,000 deep (valid FHIR shape)",
    )
    add(
        "deep-extension-400.json",
        variant(lambda d: d["entry"][0]["resource"].update(extension="@@EXT@@")).replace(
            b'"@@EXT@@"', b"[" + b'{"url":"urn:x","extension":[' * 400 + b"]}" * 400 + b"]"
        ),
        [400, 413, 422],
        "Patient.extension nested 400 deep (under Python's recursion limit)",
    )
    # -- size
    add(
        "entries-1e6.json",
        b'{"resourceType":"Bundle","type":"collection","entry":[' + b",".join([b"{}"] * 1_000_000) + b"]}",
        [400, 413, 422],
        "1,000,000 empty entries (3 MB)",
    )
    add(
        "entries-1e6-patients.json",
        b'{"resourceType":"Bundle","type":"collection","entry":['
        + b",".join([b'{"resource":{"resourceType":"Patient"}}'] * 300_000)
        + b"]}",
        [400, 413, 422],
        "300,000 Patient entries (12 MB)",
    )
    add(
        "coding-1e6.json",
        variant(lambda d: d["entry"][1]["resource"]["code"].update(coding="@@C@@")).replace(
            b'"@@C@@"', b"[" + b",".join([b"{}"] * 1_000_000) + b"]"
        ),
        [400, 413, 422],
        "one Observation with 1,000,000 codings",
    )
    add(
        "numbers-1e6.json",
        b'{"resourceType":"Bundle","type":"collection","x":[' + b",".join([b"0"] * 1_000_000) + b"]}",
        [400, 413, 422],
        "an unknown key holding 1,000,000 numbers",
    )
    add(
        "string-8mib.json",
        variant(lambda d: d["entry"][0]["resource"].update(id="a" * (8 * MIB))),
        [400, 413, 422],
        "Patient.id of 8 MiB",
    )
    add(
        "keys-60k.json",
        b'{"resourceType":"Bundle","type":"collection",' + b",".join(b'"k%d":0' % i for i in range(60_000)) + b"}",
        [400, 413, 422],
        "60,000 unknown keys",
    )
    # -- numbers and strings Python's json treats specially
    add(
        "huge-integer.json",
        json.dumps(good).encode().replace(b'"male"', b"9" * 5000),
        [400, 422],
        "a 5,000-digit integer (over Python's int-string limit)",
    )
    add("huge-float.json", json.dumps(good).encode().replace(b'"male"', b"1e999999"), [400, 422], "1e999999")
    add("nan.json", json.dumps(good).encode().replace(b'"male"', b"NaN"), [400, 422], "a bare NaN literal")
    add(
        "lone-surrogate-id.json",
        variant(lambda d: d["entry"][0]["resource"]["identifier"][0].update(value="\ud800")),
        [400, 422],
        "a Patient identifier holding a lone surrogate",
    )
    add(
        "nul-in-id.json",
        variant(lambda d: d["entry"][0]["resource"].update(id="p\u00001")),
        [400, 422],
        "a NUL inside Patient.id",
    )
    add("invalid-utf8.json", json.dumps(good).encode().replace(b"male", b"m\xffle"), [400], "invalid UTF-8")
    # -- wrong types
    wrong: dict[str, Callable[[dict[str, Any]], Any]] = {
        "resource-type-number": lambda d: d.update(resourceType=1),
        "type-list": lambda d: d.update(type=["collection"]),
        "type-unknown": lambda d: d.update(type="nonsense"),
        "entry-object": lambda d: d.update(entry={"resource": d["entry"][0]["resource"]}),
        "entry-strings": lambda d: d.update(entry=["Patient/p1"]),
        "entry-null-items": lambda d: d.update(entry=[None, None]),
        "resource-list": lambda d: d["entry"][0].update(resource=[d["entry"][0]["resource"]]),
        "resource-type-unknown": lambda d: d["entry"][0]["resource"].update(resourceType="Nonsense"),
        "birthdate-number": lambda d: d["entry"][0]["resource"].update(birthDate=19610402),
        "birthdate-year-0": lambda d: d["entry"][0]["resource"].update(birthDate="0000-01-01"),
        "birthdate-future": lambda d: d["entry"][0]["resource"].update(birthDate="9999-12-31"),
        "gender-bool": lambda d: d["entry"][0]["resource"].update(gender=True),
        "identifier-object": lambda d: d["entry"][0]["resource"].update(identifier={"value": "x"}),
        "coding-string": lambda d: d["entry"][1]["resource"]["code"].update(coding="chest-pain-type"),
        "value-quantity-string": lambda d: d["entry"][1]["resource"].update(valueQuantity="145 mmHg"),
        "value-quantity-nan": lambda d: d["entry"][1]["resource"].update(valueQuantity={"value": float("nan")}),
        "effective-garbage": lambda d: d["entry"][1]["resource"].update(effectiveDateTime="yesterday"),
        "effective-year-9999": lambda d: d["entry"][1]["resource"].update(effectiveDateTime="9999-12-31T23:59:59Z"),
        "subject-number": lambda d: d["entry"][1]["resource"].update(subject=7),
        "two-patients": lambda d: d["entry"].append(copy.deepcopy(d["entry"][0])),
        "no-patient": lambda d: d.update(entry=d["entry"][1:]),
        "status-bool": lambda d: d["entry"][1]["resource"].update(status=False),
    }
    for name, change in wrong.items():
        add(f"wrong-{name}.json", variant(change), [400, 422], f"wrong type or value: {name}")
    for name, document in {"array": [good], "string": "Bundle", "null": None, "number": 1}.items():
        add(f"wrong-top-{name}.json", json.dumps(document).encode(), [400, 422], f"the document is a JSON {name}")
    add("empty.json", b"", [400], "an empty body")
    add("not-json.json", b"<Bundle xmlns='http://hl7.org/fhir'/>", [400], "FHIR XML sent as JSON")
    add("trailing-garbage.json", json.dumps(good).encode() + b"}}}", [400], "trailing bytes after the JSON")
    # -- plain features (application/json) take the same parser's sibling
    features = {"features": {"age": 63, "sex": "male", "cp": "typical-angina"}}
    for name, body in {
        "features-deep": b'{"features":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        "features-huge-integer": json.dumps(features).encode().replace(b"63", b"9" * 5000),
        "features-list-value": json.dumps({"features": {"age": [63] * 1000}}).encode(),
        "features-object-value": json.dumps({"features": {"age": {"value": 63}}}).encode(),
        "features-nan": json.dumps({"features": {"age": float("nan"), "sex": "male", "cp": "asymptomatic"}}).encode(),
        "features-inf": json.dumps({"features": {"age": float("inf"), "sex": "male", "cp": "asymptomatic"}}).encode(),
        "features-top-list": b"[1,2,3]",
        "features-many-keys": json.dumps({"features": {f"f{i}": 0 for i in range(20_000)}}).encode(),
    }.items():
        add(f"{name}.json", body, [400, 413, 422], f"plain features: {name}", content_type="application/json")


# ------------------------------------------------------------------------- multipart family


def multipart_family(corpus: Corpus) -> None:

    def add(
        name: str,
        body: bytes,
        content_type: str,
        expect: Iterable[int],
        note: str,
        *,
        endpoint: str = STOW,
        chunked: bool = False,
    ) -> None:
        corpus.add(
            "multipart",
            name,
            body,
            endpoint=endpoint,
            content_type=content_type,
            expect=expect,
            note=note,
            chunked=chunked,
        )

    related = 'multipart/related; type="application/dicom"; boundary=b1'
    junk = det_bytes("junk-part", 2000)

    def part(body: bytes, headers: bytes = b"Content-Type: application/dicom\r\n") -> bytes:
        return b"--b1\r\n" + headers + b"\r\n" + body + b"\r\n"

    close = b"--b1--\r\n"
    dicom_a = instance(phantom(seed=11))
    other_study = instance(phantom(seed=12, patient_id="PHANTOM0002"))
    pixel_bomb = _pixel_bomb()

    for endpoint, prefix in ((STOW, "stow"), (CXR, "predict")):
        e = endpoint

        def both(
            name: str,
            body: bytes,
            content_type: str,
            expect: Iterable[int],
            note: str,
            *,
            chunked: bool = False,
            endpoint: str = e,
            prefix: str = prefix,
        ) -> None:
            add(f"{prefix}-{name}.bin", body, content_type, expect, note, endpoint=endpoint, chunked=chunked)

        both(
            "no-boundary",
            part(junk) + close,
            'multipart/related; type="application/dicom"',
            [400],
            "no boundary parameter",
        )
        both("boundary-empty", part(junk) + close, 'multipart/related; boundary=""', [400], "an empty boundary")
        both(
            "boundary-71",
            part(junk) + close,
            "multipart/related; boundary=" + "b" * 71,
            [400],
            "a 71-character boundary",
        )
        both(
            "boundary-twice",
            part(junk) + close,
            "multipart/related; boundary=b1; boundary=b2",
            [400],
            "two boundary parameters",
        )
        both(
            "boundary-crlf",
            part(junk) + close,
            'multipart/related; boundary="b1\\r\\nX: y"',
            [400],
            "a boundary with an escaped CRLF",
        )
        both(
            "type-json",
            part(junk) + close,
            'multipart/related; type="application/json"; boundary=b1',
            [415],
            "type application/json",
        )
        both("not-multipart", dicom_a, "multipart/mixed; boundary=b1", [415], "multipart/mixed")
        both("unterminated", part(junk)[:-2], related, [400], "one part, no close delimiter")
        both(
            "unterminated-after-part",
            part(junk) + b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + junk,
            related,
            [400],
            "a complete junk part, then one never closed",
        )
        both(
            "unterminated-headers",
            b"--b1\r\nContent-Type: application/dicom\r\n",
            related,
            [400],
            "the body ends inside a part's headers",
        )
        both("no-parts", b"preamble only\r\n", related, [400], "no delimiter at all")
        both("close-first", close, related, [400], "the close delimiter before any part")
        both("empty", b"", related, [400], "an empty body")
        both(
            "bare-lf",
            b"--b1\nContent-Type: application/dicom\n\n" + junk + b"\n--b1--\n",
            related,
            [400],
            "LF line endings",
        )
        both(
            "boundary-inside-part",
            part(junk + b"\r\n--b1garbage") + close,
            related,
            [400],
            "the boundary at the start of a line inside a part",
        )
        both(
            "header-1mib", part(junk, b"X-Pad: " + b"a" * MIB + b"\r\n") + close, related, [400], "a 1 MiB part header"
        )
        both(
            "header-lines-5000",
            part(junk, b"".join(b"X-%d: a\r\n" % i for i in range(5000))) + close,
            related,
            [400],
            "5,000 part header lines",
        )
        both(
            "header-repeated",
            part(junk, b"Content-Type: application/dicom\r\nContent-Type: text/plain\r\n") + close,
            related,
            [400],
            "Content-Type repeated",
        )
        both(
            "header-no-colon",
            part(junk, b"Content-Type application/dicom\r\n") + close,
            related,
            [400],
            "a header line without a colon",
        )
        both(
            "header-nul",
            part(junk, b"Content-\0Type: application/dicom\r\n") + close,
            related,
            [400],
            "a NUL in a header name",
        )
        both(
            "padding-1mib",
            b"--b1" + b" " * MIB + b"\r\n\r\n" + junk + b"\r\n" + close,
            related,
            [400],
            "1 MiB of transport padding after the boundary",
        )
        both("tiny-parts-10000", part(b"x", b"") * 10_000 + close, related, [413], "10,000 one-byte parts")
        both("empty-parts-10000", (b"--b1\r\n\r\n\r\n") * 10_000 + close, related, [413], "10,000 empty parts")
        both(
            "junk-parts",
            part(junk) * 3 + close,
            related,
            [409] if prefix == "stow" else [400],
            "three parts that are not DICOM",
        )
        both(
            "part-json",
            part(b"{}", b"Content-Type: application/json\r\n") + close,
            related,
            [409] if prefix == "stow" else [415],
            "a part that is application/json",
        )
        both(
            "pixel-bomb-part",
            part(pixel_bomb) + close,
            related,
            [409] if prefix == "stow" else [413],
            "a DICOM pixel bomb as a part",
        )
        both(
            "part-over-cap",
            part(b"\0" * (17 * MIB)) + close,
            related,
            [413],
            "one 17 MiB part (over the instance and body caps), chunked",
            chunked=True,
        )
        both(
            "body-over-cap",
            part(b"\0" * (8 * MIB)) * 3 + close,
            related,
            [413],
            "three 8 MiB parts (over the body cap), chunked",
            chunked=True,
        )
    add(
        "predict-two-studies.bin",
        part(dicom_a) + part(other_study) + close,
        related,
        [409],
        "a series mixing two studies",
        endpoint=CXR,
    )

    # The DICOM family's bombs as STOW-RS parts: each is refused (FailedSOPSequence), and whatever
    # the route does to describe the refused part must be as bounded as the reader.
    for name in (
        "deflate-bomb-1gib.dcm",
        "deflate-element-bomb.dcm",
        "deflate-items-bomb.dcm",
        "sq-element-bomb.dcm",
        "sq-wide-2m-items.dcm",
        "sq-undefined-nested-10000.dcm",
        "meta-sequence-bomb.dcm",
        "top-level-element-bomb.dcm",
    ):
        bomb = corpus.body(f"dicom/{name}")
        add(
            f"stow-part-{name.removesuffix('.dcm')}.bin",
            part(bomb) + close,
            related,
            [409],
            f"STOW-RS: the DICOM payload {name} as the only part",
        )


# -------------------------------------------------------------------------------- the check


def local_refusal() -> Callable[[bytes], bool]:
    """Whether the service's reader, allow-lists and preprocessing refuse ``data`` in-process."""
    import tomllib  # noqa: PLC0415

    from app.parsing.dicom import AcceptPolicy, DicomLimits, check_policy, read_instance  # noqa: PLC0415
    from app.preprocess.pixels import PixelRecipe, to_tensor  # noqa: PLC0415

    spec = tomllib.loads((ROOT / "models" / "cxr-pneumonia" / "model.toml").read_text(encoding="utf-8"))
    policy = AcceptPolicy.from_preprocessing(spec["preprocessing"])
    recipe = PixelRecipe.from_preprocessing(spec["preprocessing"], [-1, 1, 224, 224])
    limits = DicomLimits(max_bytes=16 * MIB, max_pixel_bytes=64 * MIB, max_frames=1024)

    def refused(data: bytes) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = read_instance(data, limits)
                check_policy(found, policy)
                to_tensor(found.dataset, recipe)
        except Exception:  # noqa: BLE001 - anything raised means the service refuses it (or fails: also kept)
            return True
        return False

    return refused


def generate(root: Path) -> Corpus:
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    corpus = Corpus(root)
    write_test_keys(root)
    dicom_family(corpus, local_refusal())
    jwe_family(corpus)
    fhir_family(corpus)
    multipart_family(corpus)
    corpus.write_index()
    return corpus


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed corpus is not current")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp) / "hostile")
            current = _same_tree(Path(tmp) / "hostile", args.out)
        print("corpus is current" if current else "corpus differs: run scripts/make_hostile_corpus.py")
        return 0 if current else 1
    corpus = generate(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    for family in ("dicom", "jwe", "fhir", "multipart"):
        count = sum(e.family == family for e in corpus.entries)
        print(f"{family:10} {count:4} payloads")
    print(f"controls   {len(corpus.controls):4}; {total} bytes on disk under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
