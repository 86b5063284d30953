"""multipart/related parsing: RFC 2046 framing, streamed at any chunk size, with every limit enforced early."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import DicomTooLargeError, MalformedBodyError, PayloadTooLargeError, UnsupportedMediaTypeError
from app.transport.http.multipart import (
    MAX_HEADER_BYTES,
    Part,
    encode_related,
    iter_parts,
    parse_related,
)

DICOM = "application/dicom"
B = "medinfer-test-boundary"
BIG = 1 << 40


class Feed:
    """A request body as an async chunk stream that records how far it was read."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self.pulled = 0
        self.bytes = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None
        self.pulled += 1
        self.bytes += len(chunk)
        return chunk


def _split(body: bytes, size: int) -> Iterable[bytes]:
    view = memoryview(body)
    return (bytes(view[start : start + size]) for start in range(0, len(body), size))


def _parse(
    body: bytes | Feed,
    boundary: str = B,
    *,
    chunk: int = 1 << 16,
    max_part_bytes: int = BIG,
    max_total_bytes: int = BIG,
    max_parts: int = 10_000,
    into: list[Part] | None = None,
) -> list[Part]:
    feed = body if isinstance(body, Feed) else Feed(_split(body, chunk))
    parts = [] if into is None else into

    async def run() -> None:
        async for part in iter_parts(
            feed,
            boundary.encode(),
            max_part_bytes=max_part_bytes,
            max_total_bytes=max_total_bytes,
            max_parts=max_parts,
        ):
            parts.append(part)

    asyncio.run(run())
    return parts


def _framed(*segments: bytes, boundary: str = B) -> bytes:
    """A body built by hand: each segment is a part's raw header block and body, already joined."""
    dash = f"--{boundary}".encode()
    return b"".join(dash + b"\r\n" + segment + b"\r\n" for segment in segments) + dash + b"--\r\n"


AWKWARD = [
    b"",
    b"\r\n",
    b"--",
    b"\r\n--",
    f"--{B}".encode()[:-1],  # a boundary one byte short
    f"x--{B}".encode(),  # the boundary, but not at the start of a line
    f"\n--{B}\n".encode(),  # after a bare LF: not a delimiter either
    os.urandom(3000),
]


# -- Round trips -------------------------------------------------------------------------------


def test_encoded_parts_come_back_with_their_media_types_and_exact_bytes() -> None:
    media, body = encode_related(
        [(DICOM, blob) for blob in AWKWARD] + [("Application/DICOM; transfer-syntax=1.2", b"z")]
    )
    related = parse_related(media)
    assert related.type == DICOM
    parts = _parse(body, related.boundary.decode())
    assert [p.body for p in parts] == [*AWKWARD, b"z"]
    assert [p.content_type for p in parts] == [DICOM] * len(AWKWARD) + [DICOM]
    assert parts[-1].headers == {"content-type": "Application/DICOM; transfer-syntax=1.2"}


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 13, 64, 1 << 16])
def test_any_chunk_size_gives_the_same_parts(chunk: int) -> None:
    _, body = encode_related([(DICOM, blob) for blob in AWKWARD], boundary=B)
    assert [p.body for p in _parse(body, chunk=chunk)] == AWKWARD


def test_a_20_mb_part_in_64_kib_chunks_arrives_intact() -> None:
    blob = os.urandom(20 * 1024 * 1024)
    _, body = encode_related([(DICOM, blob), (DICOM, b"tail")], boundary=B)
    parts = _parse(body, chunk=64 * 1024)
    assert len(parts) == 2
    assert hashlib.sha256(parts[0].body).digest() == hashlib.sha256(blob).digest()
    assert parts[1].body == b"tail"


def test_a_50_mb_body_parses_in_well_under_a_second() -> None:
    blob = b"\r\n-\x00" * (50 * 1024 * 1024 // 4)  # many near-delimiters
    _, body = encode_related([(DICOM, blob)], boundary=B)
    started = time.perf_counter()
    parts = _parse(body, chunk=64 * 1024)
    elapsed = time.perf_counter() - started
    assert len(parts[0].body) == len(blob)
    assert elapsed < 2.0  # a loose bound (about 0.1 s here), not a benchmark


def test_preamble_and_epilogue_are_ignored_and_the_epilogue_is_never_read() -> None:
    _, inner = encode_related([(DICOM, b"one"), (DICOM, b"two")], boundary=B)
    body = b"This is a preamble.\r\nIt may hold --" + B.encode() + b"-like text mid-line.\r\n" + inner
    pieces = [body, b"epilogue, never read"]

    def chunks() -> Iterable[bytes]:
        yield from pieces
        raise AssertionError("the parser read past the close delimiter")

    feed = Feed(chunks())
    assert [p.body for p in _parse(feed)] == [b"one", b"two"]
    assert feed.pulled == 1
    assert [p.body for p in _parse(body + b"epilogue\r\n--" + B.encode() + b"\r\nmore")] == [b"one", b"two"]


def test_the_opening_delimiter_may_follow_a_crlf_only_preamble() -> None:
    _, inner = encode_related([(DICOM, b"x")], boundary=B)
    assert [p.body for p in _parse(b"\r\n" + inner, chunk=1)] == [b"x"]


def test_the_close_delimiter_may_end_the_stream_without_a_crlf() -> None:
    _, body = encode_related([(DICOM, b"x")], boundary=B)
    assert [p.body for p in _parse(body.removesuffix(b"\r\n"), chunk=1)] == [b"x"]


def test_transport_padding_after_a_boundary_is_accepted() -> None:
    body = f"--{B} \t\r\nContent-Type: {DICOM}\r\n\r\nabc\r\n--{B}  \r\n\r\ndef\r\n--{B}--  \r\n".encode()
    parts = _parse(body, chunk=1)
    assert [p.body for p in parts] == [b"abc", b"def"]


def test_part_headers_are_lower_cased_unfolded_and_the_media_type_is_bare() -> None:
    body = _framed(
        b"CONTENT-TYPE: Application/Dicom ; transfer-syntax=1.2.840.10008.1.2.1\r\n"
        b"Content-Location: http://example.org/a\r\n"
        b"X-Folded: one\r\n two\r\n\tthree\r\n"
        b"\r\nbody",
        b"\r\nno headers",
        b"\r\n",  # no headers, empty body
        b"Content-Type: application/dicom\r\n\r\n",  # headers, empty body
    )
    first, bare, empty, headers_only = _parse(body, chunk=3)
    assert first.content_type == DICOM
    assert first.headers["content-location"] == "http://example.org/a"
    assert first.headers["x-folded"] == "one two three"
    assert first.body == b"body"
    assert (bare.content_type, dict(bare.headers), bare.body) == ("", {}, b"no headers")
    assert (empty.content_type, empty.body) == ("", b"")
    assert (headers_only.content_type, headers_only.body) == (DICOM, b"")


def test_a_part_with_no_headers_and_no_body_at_all_is_empty() -> None:
    # RFC 2046: body-part := MIME-part-headers [CRLF *OCTET]; both may be empty.
    body = f"--{B}\r\n\r\n--{B}--".encode()
    assert [p.body for p in _parse(body, chunk=1)] == [b""]


def test_a_parts_repr_never_shows_its_bytes() -> None:
    parts = _parse(_framed(b"Content-Type: application/dicom\r\n\r\nPATIENT^SECRET"))
    assert "SECRET" not in repr(parts[0])
    assert "14 bytes" in repr(parts[0])


@settings(max_examples=150, deadline=None)
@given(
    blobs=st.lists(
        st.lists(st.sampled_from([b"\r", b"\n", b"-", b"--", b"\r\n--", b"a", b"\x00", b" "]), max_size=40).map(
            b"".join
        ),
        min_size=1,
        max_size=6,
    ),
    boundary=st.text(alphabet="abcXYZ019'()+_,-./:=? ", min_size=1, max_size=70).filter(lambda b: b[-1] != " "),
    data=st.data(),
)
def test_random_splits_of_valid_bodies_give_identical_parts(
    blobs: list[bytes], boundary: str, data: st.DataObject
) -> None:
    dash = f"--{boundary}".encode()
    expected = [blob for blob in blobs if not blob.startswith(dash) and b"\r\n" + dash not in blob] or [b"x"]
    media, body = encode_related([(DICOM, blob) for blob in expected], boundary)
    cuts = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=20)))
    chunks = [body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    parts = _parse(Feed(chunks), parse_related(media).boundary.decode())
    assert [p.body for p in parts] == expected
    assert all(p.content_type == DICOM for p in parts)


# -- The Content-Type ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "boundary", "kind"),
    [
        (f'multipart/related; type="application/dicom"; boundary="{B}"', B, DICOM),
        (f"multipart/related; type=application/dicom; boundary={B}", B, DICOM),
        (f"Multipart/Related;BOUNDARY={B};Type=Application/DICOM", B, DICOM),
        (f"multipart/related ; boundary = {B} ;", B, ""),
        ('multipart/related; boundary="a b:c=d?(e)"', "a b:c=d?(e)", ""),
        ('multipart/related; boundary="quoted\\-pair"', "quoted-pair", ""),
        (f'multipart/related; start="<root>"; boundary={"b" * 70}', "b" * 70, ""),
    ],
)
def test_the_boundary_may_be_quoted_or_bare_and_parameters_come_in_any_order(
    header: str, boundary: str, kind: str
) -> None:
    related = parse_related(header)
    assert related.boundary == boundary.encode()
    assert related.type == kind


@pytest.mark.parametrize("header", ["", "application/dicom", "multipart/form-data; boundary=x", "multipart/relatedx"])
def test_other_media_types_are_unsupported(header: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError):
        parse_related(header)


@pytest.mark.parametrize(
    "header",
    [
        'multipart/related; type="application/dicom"',
        "multipart/related; boundary=",
        'multipart/related; boundary=""',
        f"multipart/related; boundary={'b' * 71}",
        'multipart/related; boundary="ends in space "',
        'multipart/related; boundary="bad\\"quote"',
        "multipart/related; boundary=a; boundary=b",
        "multipart/related; boundary=a junk",
        'multipart/related; boundary="unclosed',
        "multipart/related; boundary=caf\u00e9",
    ],
)
def test_a_missing_or_invalid_boundary_is_a_malformed_body(header: str) -> None:
    with pytest.raises(MalformedBodyError):
        parse_related(header)


# -- Malformed bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        f"--{B}\r\nContent-Type: {DICOM}\r\n\r\nabc".encode(),
        f"--{B}\r\nContent-Type: {DICOM}\r\n\r\nabc\r\n--{B}\r\n".encode(),
        f"--{B}\r\nContent-Type: {DICOM}\r\n".encode(),
        f"--{B}\r\n".encode(),
        f"--{B}".encode(),
        f"--{B}\r\n\r\nabc\r\n--{B}-".encode(),
    ],
)
@pytest.mark.parametrize("chunk", [1, 1 << 16])
def test_a_body_that_stops_before_the_close_delimiter_is_unterminated(body: bytes, chunk: int) -> None:
    with pytest.raises(MalformedBodyError, match="unterminated"):
        _parse(body, chunk=chunk)


@pytest.mark.parametrize(
    "body",
    [b"", b"just a preamble\r\n", f"--{B}--\r\n".encode(), f"preamble\r\n--{B}--".encode(), f"x--{B}\r\n".encode()],
)
def test_a_body_without_any_part_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedBodyError, match="no parts"):
        _parse(body, chunk=1)


def test_bare_lf_line_endings_are_refused_with_a_clear_detail() -> None:
    body = f"--{B}\nContent-Type: {DICOM}\n\nabc\n--{B}--\n".encode()
    with pytest.raises(MalformedBodyError, match="CRLF"):
        _parse(body)


def test_the_boundary_as_a_line_prefix_inside_a_part_is_refused() -> None:
    # RFC 2046 §5.1.1 matches the boundary as a prefix of a line; it may not occur in a part.
    body = _framed(f"\r\nabc\r\n--{B}XYZ more".encode())
    with pytest.raises(MalformedBodyError, match="boundary"):
        _parse(body)


def test_the_boundary_inside_a_part_but_not_after_a_crlf_is_content() -> None:
    blob = f"x--{B} mid-line, \n--{B}\n after a bare LF, \r--{B}--\r after a bare CR".encode()
    body = _framed(b"\r\n" + blob)
    assert _parse(body, chunk=1)[0].body == blob


@pytest.mark.parametrize(
    "headers",
    [
        b"no colon here\r\n\r\n",
        b"Bad Name: x\r\n\r\n",
        b" leading continuation\r\n\r\n",
        b"A: 1\r\na: 2\r\n\r\n",
        b"A: 1\nB: 2\r\n\r\n",
        b"A: \xff\r\n\r\n",
    ],
)
def test_malformed_part_headers_are_refused(headers: bytes) -> None:
    with pytest.raises(MalformedBodyError):
        _parse(_framed(headers + b"body"))


def test_a_header_block_over_the_cap_is_refused_before_more_is_buffered() -> None:
    huge = b"X-Pad: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\nbody"
    with pytest.raises(MalformedBodyError, match="headers exceed"):
        _parse(_framed(huge), chunk=1024)
    # Without the blank line ever arriving, the parser stops at the cap rather than at the end.
    feed = Feed(_split(f"--{B}\r\nX-Pad: ".encode() + b"a" * (10 * MAX_HEADER_BYTES), 1024))
    with pytest.raises(MalformedBodyError, match="headers exceed"):
        _parse(feed)
    assert feed.bytes < MAX_HEADER_BYTES + 2 * 1024


def test_a_header_block_just_under_the_cap_is_accepted() -> None:
    block = b"X-Pad: " + b"a" * (MAX_HEADER_BYTES - 9) + b"\r\n"
    assert len(block) == MAX_HEADER_BYTES
    assert _parse(_framed(block + b"\r\nbody"), chunk=7)[0].body == b"body"


# -- Limits -------------------------------------------------------------------------------------


def test_a_part_over_max_part_bytes_is_an_instance_too_large() -> None:
    _, body = encode_related([(DICOM, b"a" * 1000), (DICOM, b"b" * 1001)], boundary=B)
    parts: list[Part] = []
    with pytest.raises(DicomTooLargeError, match="1000 bytes"):
        _parse(body, max_part_bytes=1000, into=parts)
    assert [len(p.body) for p in parts] == [1000]  # what came before stays yielded


def test_an_oversized_part_is_refused_while_it_streams_in() -> None:
    cap, chunk = 64 * 1024, 8 * 1024
    body = f"--{B}\r\n\r\n".encode() + b"x" * (100 * cap)  # never terminated
    feed = Feed(_split(body, chunk))
    with pytest.raises(DicomTooLargeError):
        _parse(feed, max_part_bytes=cap)
    assert feed.bytes <= cap + 2 * chunk


def test_a_body_over_max_total_bytes_is_refused_before_more_is_read() -> None:
    _, body = encode_related([(DICOM, b"a" * 5000)] * 4, boundary=B)
    feed = Feed(_split(body, 1000))
    with pytest.raises(PayloadTooLargeError):
        _parse(feed, max_total_bytes=len(body) - 1)
    assert feed.bytes == len(body)  # the chunk that crossed the cap, and nothing after it
    feed = Feed(_split(b"preamble " * 10_000, 1000))
    with pytest.raises(PayloadTooLargeError):
        _parse(feed, max_total_bytes=5000)
    assert feed.bytes <= 6000
    assert len(_parse(body, max_total_bytes=len(body))) == 4


@pytest.mark.parametrize("max_parts", [1000, 10_000])
def test_ten_thousand_tiny_parts_are_refused_fast_in_bounded_memory(max_parts: int) -> None:
    _, body = encode_related([(DICOM, b"x")] * (10_000 + 1), boundary=B)
    max_part_bytes = 4096
    seen = 0

    async def run() -> None:
        nonlocal seen
        async for _ in iter_parts(
            Feed(_split(body, 4096)),
            B.encode(),
            max_part_bytes=max_part_bytes,
            max_total_bytes=BIG,
            max_parts=max_parts,
        ):
            seen += 1

    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PayloadTooLargeError, match=f"more than {max_parts} parts"):
            asyncio.run(run())
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == max_parts
    assert elapsed < 2.0  # a bound, not a benchmark
    assert peak < 16 * max_part_bytes


def test_exactly_max_parts_parts_are_accepted() -> None:
    _, body = encode_related([(DICOM, b"x")] * 3, boundary=B)
    assert len(_parse(body, max_parts=3)) == 3


@pytest.mark.parametrize(("part", "total", "count"), [(0, BIG, 1), (BIG, -1, 1), (BIG, BIG, 0)])
def test_limits_must_be_positive(part: int, total: int, count: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        _parse(b"", max_part_bytes=part, max_total_bytes=total, max_parts=count)


# -- encode_related ------------------------------------------------------------------------------


def test_encode_related_names_the_root_type_and_a_random_boundary() -> None:
    media, body = encode_related([("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", b"x")])
    other, _ = encode_related([(DICOM, b"x")])
    related = parse_related(media)
    assert related.type == DICOM
    assert related.boundary != parse_related(other).boundary
    assert body.startswith(b"--" + related.boundary + b"\r\n")
    assert body.endswith(b"--" + related.boundary + b"--\r\n")


@pytest.mark.parametrize(
    ("parts", "boundary", "problem"),
    [
        ([], None, "at least one part"),
        ([(DICOM, b"x")], "", "invalid multipart boundary"),
        ([(DICOM, b"x")], "b" * 71, "invalid multipart boundary"),
        ([(DICOM, b"x")], "trailing space ", "invalid multipart boundary"),
        ([(DICOM, f"a\r\n--{B}\r\n".encode())], B, "inside a part"),
        ([(DICOM, f"--{B}".encode())], B, "inside a part"),
        ([("application/dicom\r\nX-Injected: 1", b"x")], B, "CR or LF"),
    ],
)
def test_encode_related_refuses_what_would_not_survive(
    parts: list[tuple[str, bytes]], boundary: str | None, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        encode_related(parts, boundary)
