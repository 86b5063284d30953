"""JSON limits for EHR bodies: depth counts containers, the value cap is the documented one."""

from __future__ import annotations

import json

import pytest

from app.errors import MalformedBodyError, PayloadTooLargeError
from app.parsing.fhir import MAX_JSON_DEPTH, MAX_JSON_VALUES, load_json


def _nested(containers: int, innermost: str) -> bytes:
    return ("[" * containers + innermost + "]" * containers).encode()


@pytest.mark.parametrize("innermost", ["", "1", '"x"'])
def test_containers_nested_exactly_to_the_cap_are_accepted(innermost: str) -> None:
    assert load_json(_nested(MAX_JSON_DEPTH, innermost)) is not None


@pytest.mark.parametrize("innermost", ["", "1"])
def test_one_container_more_is_refused(innermost: str) -> None:
    with pytest.raises(MalformedBodyError, match=f"deeper than {MAX_JSON_DEPTH}"):
        load_json(_nested(MAX_JSON_DEPTH + 1, innermost))


def test_the_value_cap_counts_every_value() -> None:
    at_cap = json.dumps(list(range(MAX_JSON_VALUES - 1))).encode()  # the list itself is a value
    assert len(load_json(at_cap)) == MAX_JSON_VALUES - 1
    with pytest.raises(PayloadTooLargeError, match=str(MAX_JSON_VALUES)):
        load_json(json.dumps(list(range(MAX_JSON_VALUES))).encode())
