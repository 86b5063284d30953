"""``multipart/related`` bodies (RFC 2387 over the RFC 2046 §5.1 grammar), parsed as they stream in.

STOW-RS (PS3.18 §10.5) sends one DICOM instance per part. :func:`iter_parts` reads the request's
chunks one at a time and yields each part as soon as the delimiter after it arrives, so memory
stays O(``max_part_bytes`` + one chunk) however long the body is, and a chunked body without a
``Content-Length`` is bounded all the same. Every limit is checked as soon as the bytes that
break it arrive, before anything more is read.

Choices where the RFCs leave room or where receivers differ:

* Lines end in CRLF, as RFC 2046 requires. A bare LF is refused rather than tolerated: allowing
  it would make ``LF--boundary`` inside a binary instance a delimiter too, and every HTTP client
  sends CRLF. A boundary line that ends in a bare LF gets a detail that says so.
* A delimiter is ``CRLF--boundary`` at the start of any line, matched as a prefix (RFC 2046
  §5.1.1, "Note to implementors"). What follows it must be ``--`` (the close delimiter),
  or optional transport padding (spaces and tabs) and CRLF; anything else means the boundary
  occurs inside a part, which RFC 2046 forbids, so the body is refused rather than guessed at.
  ``--boundary`` not at the start of a line is body content.
* The preamble and the epilogue are ignored (RFC 2046 §5.1.1); nothing after the close delimiter
  is read at all.
* A part's header block is capped at :data:`MAX_HEADER_BYTES`; header names are lower-cased and
  may not repeat; obsolete line folding is unfolded.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from app.errors import DicomTooLargeError, MalformedBodyError, PayloadTooLargeError, UnsupportedMediaTypeError

MULTIPART_RELATED: Final = "multipart/related"

#: Cap on one part's header block, the blank line excluded. Legitimate parts carry a
#: Content-Type and perhaps a Content-Location: well under 1 KiB.
MAX_HEADER_BYTES: Final = 16 * 1024

#: Cap on the transport padding (RFC 2046 LWSP) after a boundary. Receivers must accept padding;
#: the cap only keeps a run of spaces from being rescanned with every chunk.
MAX_PADDING_BYTES: Final = 1024

_CRLF: Final = b"\r\n"
_LF: Final = 0x0A
_MAX_BOUNDARY: Final = 70

# RFC 2046 §5.1.1: bchars := bcharsnospace / " "; the last character may not be a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MEDIA_TYPE = re.compile(r"\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*")
# A parameter: token "=" (quoted-string / bare value). Bare values are allowed to hold "/" and
# other tspecials, since clients commonly send type=application/dicom unquoted.
_PARAMETER = re.compile(r';\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*(?:"((?:[^"\\\r\n]|\\[^\r\n])*)"|([^\s";]+))\s*')
_EMPTY_PARAMETER = re.compile(r";\s*(?=;|$)")
_QUOTED_PAIR = re.compile(r"\\(.)")
_PADDING = re.compile(rb"[ \t]*")


@dataclass(frozen=True, slots=True, repr=False)
class Part:
    """One body part: its headers (names lower-cased), its media type and its bytes.

    The repr gives the body's length only: a DICOM body holds PHI and may be tens of megabytes,
    and reprs end up in logs, tracebacks and test reports.
    """

    headers: Mapping[str, str]
    content_type: str
    """Media type only, lower-cased, parameters stripped; ``""`` without a Content-Type."""
    body: bytes

    def __repr__(self) -> str:
        return (
            f"Part(content_type={self.content_type!r}, headers={sorted(self.headers)!r}, body=<{len(self.body)} bytes>)"
        )


@dataclass(frozen=True, slots=True)
class RelatedType:
    """What a ``multipart/related`` Content-Type declares."""

    boundary: bytes
    type: str
    """The ``type`` parameter (RFC 2387 §3.1), lower-cased; ``""`` if absent."""


def parse_related(content_type: str) -> RelatedType:
    """Read the boundary and the ``type`` parameter from a ``multipart/related`` Content-Type.

    Parameters may be quoted or bare, in any order; names are case-insensitive, values are not.
    Raises :class:`UnsupportedMediaTypeError` for any other media type and
    :class:`MalformedBodyError` for a missing, repeated or invalid boundary (RFC 2046 §5.1.1:
    1 to 70 characters from ``bchars``, not ending in a space).
    """
    head = _MEDIA_TYPE.match(content_type)
    if head is None or head.group(1).lower() != MULTIPART_RELATED:
        raise UnsupportedMediaTypeError(f"expected {MULTIPART_RELATED}")
    params: dict[str, str] = {}
    pos = head.end()
    while pos < len(content_type):
        match = _PARAMETER.match(content_type, pos)
        if match is None:
            empty = _EMPTY_PARAMETER.match(content_type, pos)
            if empty is None:
                raise MalformedBodyError("malformed Content-Type parameters")
            pos = empty.end()
            continue
        name = match.group(1).lower()
        if name in params:
            raise MalformedBodyError(f"repeated Content-Type parameter {name}")
        quoted, bare = match.group(2), match.group(3)
        params[name] = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else bare
        pos = match.end()
    boundary = params.get("boundary")
    if boundary is None:
        raise MalformedBodyError("multipart/related without a boundary parameter")
    if not _BOUNDARY.fullmatch(boundary):
        raise MalformedBodyError("invalid multipart boundary (RFC 2046: 1 to 70 characters from bchars)")
    return RelatedType(boundary=boundary.encode("ascii"), type=params.get("type", "").lower())


async def iter_parts(
    chunks: AsyncIterable[bytes],
    boundary: bytes,
    *,
    max_part_bytes: int,
    max_total_bytes: int,
    max_parts: int,
) -> AsyncIterator[Part]:
    """Yield the parts of a multipart body as its chunks arrive (for example ``request.stream()``).

    Raises, as soon as the bytes that prove it arrive:

    * :class:`PayloadTooLargeError` when the body (preamble included) passes ``max_total_bytes``,
      or when part number ``max_parts + 1`` opens;
    * :class:`DicomTooLargeError` when one part's body passes ``max_part_bytes``: each STOW-RS part
      is one instance, so this is the per-instance cap;
    * :class:`MalformedBodyError` when there is no part, when the body ends before the close
      delimiter, or when the framing breaks RFC 2046 (see the module docstring).

    Parts already yielded stay valid when a later one raises; the caller decides what to do
    with them.
    """
    splitter = _Splitter(boundary, max_part_bytes=max_part_bytes, max_total_bytes=max_total_bytes, max_parts=max_parts)
    async for chunk in chunks:
        for part in splitter.feed(chunk):
            yield part
        if splitter.done:
            return
    for part in splitter.finish():
        yield part


def encode_related(parts: Sequence[tuple[str, bytes]], boundary: str | None = None) -> tuple[str, bytes]:
    """Build a ``multipart/related`` body from ``(media type, bytes)`` pairs.

    Returns the Content-Type header value (``type`` is the first part's media type, RFC 2387
    §3.1) and the body. Without a ``boundary`` a random one is drawn; a given boundary that is
    invalid, or that starts a line inside a part (RFC 2046 §5.1.1), raises :class:`ValueError`,
    since the parts would not survive the trip.
    """
    if not parts:
        raise ValueError("a multipart body needs at least one part (RFC 2046 §5.1.1)")
    if boundary is None:
        boundary = secrets.token_hex(16)
        while any(_opens_line(body, boundary) for _, body in parts):  # pragma: no cover - 2**-128
            boundary = secrets.token_hex(16)
    elif not _BOUNDARY.fullmatch(boundary):
        raise ValueError("invalid multipart boundary (RFC 2046: 1 to 70 characters from bchars)")
    dash = b"--" + boundary.encode("ascii")
    pieces: list[bytes] = []
    for media_type, body in parts:
        if _opens_line(body, boundary):
            raise ValueError("the boundary occurs inside a part, at the start of a line")
        if "\r" in media_type or "\n" in media_type:
            raise ValueError("a media type may not contain CR or LF")
        pieces += [dash, b"\r\nContent-Type: ", media_type.encode("ascii"), b"\r\n\r\n", body, _CRLF]
    pieces += [dash, b"--\r\n"]
    root_type = parts[0][0].split(";", 1)[0].strip()
    return f'{MULTIPART_RELATED}; type="{root_type}"; boundary="{boundary}"', b"".join(pieces)


def _opens_line(body: bytes, boundary: str) -> bool:
    """Whether ``--boundary`` starts a line of ``body`` once framed (it follows a CRLF there)."""
    dash = b"--" + boundary.encode("ascii")
    return body.startswith(dash) or _CRLF + dash in body


class _State(enum.Enum):
    PREAMBLE = enum.auto()
    HEADERS = enum.auto()
    BODY = enum.auto()
    DONE = enum.auto()


class _Delimiter(enum.Enum):
    NEXT = enum.auto()
    CLOSE = enum.auto()


class _Splitter:
    """The push parser behind :func:`iter_parts`: feed chunks, collect parts.

    The buffer only ever holds the current part (at most ``max_part_bytes`` plus a delimiter's
    length) and the chunk being fed. Searches resume where the previous one stopped, less the
    length of a delimiter that may straddle two chunks, so the whole body is scanned once.
    """

    def __init__(self, boundary: bytes, *, max_part_bytes: int, max_total_bytes: int, max_parts: int) -> None:
        if not 1 <= len(boundary) <= _MAX_BOUNDARY or b"\r" in boundary or b"\n" in boundary:
            raise ValueError("invalid multipart boundary")
        if min(max_part_bytes, max_total_bytes, max_parts) < 1:
            raise ValueError("limits must be positive")
        self._dash = b"--" + boundary
        self._delimiter = _CRLF + self._dash
        self._max_part = max_part_bytes
        self._max_total = max_total_bytes
        self._max_parts = max_parts
        self._buf = bytearray()
        self._state = _State.PREAMBLE
        self._at_stream_start = True
        self._total = 0
        self._parts = 0
        self._counted = False
        self._scan = 0  # where the next search for a delimiter or a header end starts
        self._headers: Mapping[str, str] = MappingProxyType({})
        self._body_start = 0

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def feed(self, chunk: bytes) -> Iterator[Part]:
        if self._state is _State.DONE or not chunk:
            return
        self._total += len(chunk)
        if self._total > self._max_total:
            raise PayloadTooLargeError(f"the multipart body exceeds {self._max_total} bytes")
        self._buf += chunk
        yield from self._drain(eof=False)

    def finish(self) -> Iterator[Part]:
        yield from self._drain(eof=True)
        if self._state is _State.PREAMBLE:
            raise MalformedBodyError("no parts: the multipart body has no opening boundary delimiter")
        if self._state is not _State.DONE:
            raise MalformedBodyError("unterminated multipart body")

    def _drain(self, *, eof: bool) -> Iterator[Part]:
        while True:
            if self._state is _State.PREAMBLE:
                if not self._skip_preamble(eof=eof):
                    return
            elif self._state is _State.HEADERS:
                if not self._read_headers():
                    return
            elif self._state is _State.BODY:
                part = self._read_body(eof=eof)
                if part is None:
                    return
                yield part
            else:
                return

    def _open_part(self, end: int) -> None:
        """A delimiter line ending at ``end`` opens another part; it is counted when read."""
        del self._buf[:end]
        self._scan = 0
        self._counted = False
        self._state = _State.HEADERS

    def _skip_preamble(self, *, eof: bool) -> bool:
        buf = self._buf
        if self._at_stream_start:
            # The very first delimiter may start the stream without a CRLF before it.
            if buf.startswith(self._dash):
                return self._after_opening(len(self._dash), eof=eof)
            if len(buf) < len(self._dash) and self._dash.startswith(buf) and not eof:
                return False
            self._at_stream_start = False
        found = buf.find(self._delimiter, self._scan)
        if found < 0:
            keep = len(self._delimiter) - 1
            if len(buf) > keep:
                del buf[: len(buf) - keep]
            self._scan = 0
            return False
        del buf[:found]
        self._scan = 0
        return self._after_opening(len(self._delimiter), eof=eof)

    def _after_opening(self, end_of_boundary: int, *, eof: bool) -> bool:
        kind = self._delimiter_kind(end_of_boundary, eof=eof)
        if kind is None:
            return False
        if kind[0] is _Delimiter.CLOSE:
            raise MalformedBodyError("no parts: the multipart body closes before its first part")
        self._open_part(kind[1])
        return True

    def _read_headers(self) -> bool:
        if not self._counted:
            self._parts += 1
            self._counted = True
            if self._parts > self._max_parts:
                raise PayloadTooLargeError(f"more than {self._max_parts} parts")
        buf = self._buf
        if len(buf) < len(_CRLF):
            return False
        if buf.startswith(_CRLF):  # no header fields at all
            fields_end = 0
        else:
            found = buf.find(b"\r\n\r\n", self._scan, MAX_HEADER_BYTES + 4)
            if found < 0:
                if len(buf) >= MAX_HEADER_BYTES + 4:
                    raise MalformedBodyError(f"a part's headers exceed {MAX_HEADER_BYTES} bytes")
                self._scan = max(0, len(buf) - 3)
                return False
            fields_end = found + 2
        self._headers = _parse_headers(bytes(buf[:fields_end]))
        # The blank line's CRLF may double as the CRLF of the next delimiter (an empty body),
        # so the search for the delimiter starts on it.
        self._body_start = fields_end + 2
        self._scan = fields_end
        self._state = _State.BODY
        return True

    def _read_body(self, *, eof: bool) -> Part | None:
        buf = self._buf
        found = buf.find(self._delimiter, self._scan)
        if found < 0:
            # Bytes before `settled` cannot begin a delimiter any more: they are body.
            settled = len(buf) - len(self._delimiter) + 1
            if settled - self._body_start > self._max_part:
                raise DicomTooLargeError(f"a part exceeds {self._max_part} bytes")
            self._scan = max(self._scan, settled)
            return None
        if found - self._body_start > self._max_part:
            raise DicomTooLargeError(f"a part exceeds {self._max_part} bytes")
        kind = self._delimiter_kind(found + len(self._delimiter), eof=eof)
        if kind is None:
            self._scan = found
            return None
        delimiter, end = kind
        headers = self._headers
        part = Part(
            headers=headers,
            content_type=headers.get("content-type", "").split(";", 1)[0].strip().lower(),
            body=bytes(buf[self._body_start : found]) if found > self._body_start else b"",
        )
        if delimiter is _Delimiter.CLOSE:
            buf.clear()
            self._state = _State.DONE
        else:
            self._open_part(end)
        return part

    def _delimiter_kind(self, at: int, *, eof: bool) -> tuple[_Delimiter, int] | None:
        """Classify the delimiter line whose boundary ends at ``at``: close, or another part (with
        the index just past its CRLF). ``None`` until enough bytes have arrived to tell."""
        buf = self._buf
        if buf[at : at + 2] == b"--":
            return _Delimiter.CLOSE, at + 2  # the rest of the line is epilogue
        padding = _PADDING.match(buf, at, min(len(buf), at + MAX_PADDING_BYTES + 1))
        end = padding.end() if padding is not None else at
        if end - at > MAX_PADDING_BYTES:
            raise MalformedBodyError(f"more than {MAX_PADDING_BYTES} bytes of padding after a boundary")
        if buf[end : end + 2] == _CRLF:
            return _Delimiter.NEXT, end + 2
        rest = bytes(buf[end : end + 2])
        if rest in (b"", b"\r") or (rest == b"-" and end == at):
            if eof:
                raise MalformedBodyError("unterminated multipart body")
            return None
        if rest[0] == _LF:
            raise MalformedBodyError("multipart lines must end in CRLF, not a bare LF (RFC 2046)")
        raise MalformedBodyError("a boundary delimiter line goes on with unexpected bytes (RFC 2046 §5.1.1)")


def _parse_headers(block: bytes) -> Mapping[str, str]:
    """Parse a part's header fields (each ending in CRLF); obsolete folding is unfolded."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedBodyError("a part's headers are not UTF-8") from None
    headers: dict[str, str] = {}
    last: str | None = None
    for line in text.split("\r\n")[:-1]:
        if "\r" in line or "\n" in line:
            raise MalformedBodyError("a part's header lines must end in CRLF")
        if line[:1] in {" ", "\t"}:
            if last is None:
                raise MalformedBodyError("a part's headers begin with a continuation line")
            headers[last] = (headers[last] + " " + line.strip(" \t")).strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise MalformedBodyError("malformed part header")
        name = name.lower()
        if name in headers:
            raise MalformedBodyError("repeated part header")
        headers[name] = value.strip(" \t")
        last = name
    return MappingProxyType(headers)
