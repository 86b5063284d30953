from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from app.errors import InvalidTensorError, MalformedBodyError, PayloadTooLargeError
from app.transport.http.v2_codec import deadline_from_parameters, decode_request, encode_response

CAP = 1 << 20


def _binary_body(header: dict[str, object], *blobs: bytes) -> tuple[bytes, int]:
    raw = json.dumps(header).encode()
    return raw + b"".join(blobs), len(raw)


def test_json_tensors_decode_nested_or_flat() -> None:
    body = json.dumps(
        {
            "id": "7",
            "inputs": [
                {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]},
                {"name": "b", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]},
            ],
        }
    ).encode()
    decoded = decode_request(body, None, CAP)
    assert decoded.request.id == "7"
    np.testing.assert_array_equal(decoded.tensors["a"], np.array([[1, 2], [3, 4]], np.float32))
    assert decoded.tensors["a"].dtype == np.float32
    assert decoded.tensors["b"].dtype == np.int64


def test_binary_tensors_follow_the_json_header() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = {
        "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True},
    }
    body, length = _binary_body(header, x.tobytes())
    decoded = decode_request(body, length, CAP)
    np.testing.assert_array_equal(decoded.tensors["x"], x)
    payload, json_length = encode_response("m", "1", None, {"y": x * 2}, decoded)
    assert json_length is not None
    meta = json.loads(payload[:json_length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    np.testing.assert_array_equal(np.frombuffer(payload[json_length:], np.float32).reshape(2, 3), x * 2)


def test_bytes_tensors_use_length_prefixed_elements() -> None:
    blob = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    header = {
        "inputs": [{"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}]
    }
    body, length = _binary_body(header, blob)
    assert list(decode_request(body, length, CAP).tensors["s"]) == [b"ab", b"", b"xyz"]


def test_json_outputs_are_flattened_row_major_with_the_id_echoed() -> None:
    decoded = decode_request(
        json.dumps({"id": "abc", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}).encode(),
        None,
        CAP,
    )
    payload, json_length = encode_response("m", "3", "abc", {"y": np.array([[0.25, 0.75]], np.float32)}, decoded)
    assert json_length is None
    assert json.loads(payload) == {
        "model_name": "m",
        "model_version": "3",
        "id": "abc",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}],
    }


PROVENANCE = {"model_sha256": "ab" * 32, "not_for_clinical_use": True, "intended_use": "Tests only."}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_provenance_parameters_ride_in_the_json_header_of_both_forms(binary: bool) -> None:
    request: dict[str, object] = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
    if binary:
        request["parameters"] = {"binary_data_output": True}
    decoded = decode_request(json.dumps(request).encode(), None, CAP)
    outputs = {"y": np.array([[0.25, 0.75]], np.float32), "score": np.array([3.5], np.float32)}
    payload, json_length = encode_response("m", "2", None, outputs, decoded, parameters=PROVENANCE)
    header = json.loads(payload if json_length is None else payload[:json_length])
    assert header["parameters"] == PROVENANCE
    assert [o["name"] for o in header["outputs"]] == ["y", "score"]  # every output when none is named
    assert (json_length is not None) is binary
    if binary:
        assert json_length is not None
        assert np.frombuffer(payload[json_length:], np.float32).tolist() == [0.25, 0.75, 3.5]


@pytest.mark.parametrize(
    ("body", "length", "error", "message"),
    [
        (b"{not json", None, MalformedBodyError, "not valid JSON"),
        (b'{"inputs": []}', None, MalformedBodyError, "inputs"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP99", "data": [1, 2]}]}',
            None,
            InvalidTensorError,
            "unknown datatype",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}',
            None,
            InvalidTensorError,
            "2 elements for shape",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]}',
            None,
            InvalidTensorError,
            "not a list of FP32",
        ),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32"}]}', None, InvalidTensorError, "no 'data'"),
        (
            b'{"inputs": [{"name": "x", "shape": [100000000], "datatype": "FP32", "data": []}]}',
            None,
            PayloadTooLargeError,
            "tensor cap",
        ),
        (b'{"inputs": []}', 500, MalformedBodyError, "does not fit"),
    ],
)
def test_bad_requests_name_what_is_wrong(body: bytes, length: int | None, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_request(body, length, CAP)


def test_binary_size_that_disagrees_with_the_shape_is_refused() -> None:
    header = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 20}}]}
    body, length = _binary_body(header, b"\0" * 20)
    with pytest.raises(InvalidTensorError, match="20 bytes for shape"):
        decode_request(body, length, CAP)


def test_binary_size_that_overruns_the_body_is_refused() -> None:
    header = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    body, length = _binary_body(header, b"\0" * 4)
    with pytest.raises(InvalidTensorError, match="overruns"):
        decode_request(body, length, CAP)


def test_triton_timeout_parameter_is_in_microseconds() -> None:
    assert deadline_from_parameters({"timeout": 250_000}) == pytest.approx(0.25)
    assert deadline_from_parameters(None) is None
    with pytest.raises(InvalidTensorError):
        deadline_from_parameters({"timeout": -1})


@pytest.mark.parametrize(
    "header",
    [b"[" * 100_000 + b"]" * 100_000, b'{"id": ' + b"9" * 5000 + b"}"],
    ids=["nested-past-the-interpreter-limit", "integer-over-4300-digits"],
)
def test_json_that_the_parser_itself_refuses_is_malformed_not_a_crash(header: bytes) -> None:
    # An integer is refused past 20 digits while it is parsed (app.parsing.numbers), long before
    # the interpreter's own 4,300-digit limit.
    with pytest.raises(MalformedBodyError, match=r"not valid JSON|more than 20 digits"):
        decode_request(header, None, CAP)
