"""Numbers in JSON bodies, bounded while they are parsed, before any conversion.

``json`` turns any run of digits into a Python ``int`` (up to 4,300 digits) and the pipeline then
calls ``float()`` on it, which overflows: a 4,000-digit ``trestbps`` answered 500. These hooks
refuse such a number inside ``json.loads`` itself, so no later ``float()``, numpy cast or column
ever sees it. Nothing a hospital sends needs more than 20 digits (an unsigned 64-bit integer).
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from app.errors import MalformedBodyError

MAX_INT_DIGITS: Final = 20
#: The longest decimal spelling of a double a serializer writes is 24 characters; leave room.
MAX_FLOAT_CHARS: Final = 64


def bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise MalformedBodyError(f"a number in the body has more than {MAX_INT_DIGITS} digits")
    return int(text)


def finite_float(text: str) -> float:
    if len(text) > MAX_FLOAT_CHARS:
        raise MalformedBodyError(f"a number in the body is longer than {MAX_FLOAT_CHARS} characters")
    value = float(text)
    if not math.isfinite(value):
        raise MalformedBodyError("a number in the body is out of range (beyond a double)")
    return value


def _no_constant(_name: str) -> float:
    raise MalformedBodyError("NaN and Infinity are not JSON numbers")


def loads_bounded(text: bytes | str) -> Any:
    """``json.loads`` with every number bounded (and NaN/Infinity refused, as RFC 8259 does)."""
    return json.loads(text, parse_int=bounded_int, parse_float=finite_float, parse_constant=_no_constant)


def loads_bounded_ints(text: bytes | str) -> Any:
    """``json.loads`` with integers bounded; floats as ``json`` reads them (tensor payloads)."""
    return json.loads(text, parse_int=bounded_int)
