"""STOW-RS results: PS3.18 §10.5.3 statuses, the Annex I response module in DICOM JSON, one failure table."""

from __future__ import annotations

import json
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage, generate_uid

from app import errors as e
from app.transport.http.stow import (
    DICOM_JSON,
    FAILURE_REASON_BY_ERROR,
    FailedInstance,
    FailureReason,
    StoredInstance,
    WarningReason,
    failure_reason,
    stow_response,
)

STUDY_URL = "https://medinfer.example/dicomweb/studies/1.2.3"


def _stored(retrieve_url: str | None = None, warning: int | None = None) -> StoredInstance:
    return StoredInstance(CTImageStorage, generate_uid(), retrieve_url, warning)


def _failed(reason: int = FailureReason.CANNOT_UNDERSTAND, *, known: bool = True) -> FailedInstance:
    if not known:
        return FailedInstance(None, None, reason)
    return FailedInstance(SecondaryCaptureImageStorage, generate_uid(), reason)


def _round_trip(body: dict[str, Any]) -> pydicom.Dataset:
    """Decode the body the way a client would, and check nothing was lost on the way."""
    dataset = pydicom.Dataset.from_json(json.dumps(body))
    assert dataset.to_json_dict() == body
    return dataset


def test_the_media_type_is_dicom_json() -> None:
    assert DICOM_JSON == "application/dicom+json"


def test_all_stored_is_200_with_only_the_referenced_sop_sequence() -> None:
    stored = [_stored(f"{STUDY_URL}/series/1/instances/{i}") for i in range(2)]
    status, body = stow_response(stored, [], study_retrieve_url=STUDY_URL)
    assert status == 200
    assert list(body) == ["00081190", "00081199"]
    dataset = _round_trip(body)
    assert dataset.RetrieveURL == STUDY_URL
    assert "FailedSOPSequence" not in dataset
    assert [item.ReferencedSOPInstanceUID for item in dataset.ReferencedSOPSequence] == [
        s.sop_instance_uid for s in stored
    ]
    assert [item.RetrieveURL for item in dataset.ReferencedSOPSequence] == [s.retrieve_url for s in stored]
    assert all(item.ReferencedSOPClassUID == CTImageStorage for item in dataset.ReferencedSOPSequence)
    assert all("WarningReason" not in item for item in dataset.ReferencedSOPSequence)


def test_some_failed_is_202_with_both_sequences() -> None:
    stored, failed = _stored(), _failed(FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED)
    status, body = stow_response([stored], [failed], study_retrieve_url=STUDY_URL)
    assert status == 202
    assert list(body) == ["00081190", "00081198", "00081199"]
    dataset = _round_trip(body)
    (item,) = dataset.FailedSOPSequence
    assert item.ReferencedSOPClassUID == SecondaryCaptureImageStorage
    assert item.ReferencedSOPInstanceUID == failed.sop_instance_uid
    assert item.FailureReason == 0xC122
    assert dataset.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == stored.sop_instance_uid


def test_all_stored_but_one_with_a_warning_is_202() -> None:
    # PS3.18 Table 10.5.3-1: 202 when "warnings or failures exist".
    status, body = stow_response(
        [_stored(), _stored(warning=WarningReason.COERCION_OF_DATA_ELEMENTS)], [], study_retrieve_url=None
    )
    assert status == 202
    dataset = _round_trip(body)
    assert "WarningReason" not in dataset.ReferencedSOPSequence[0]
    assert dataset.ReferencedSOPSequence[1].WarningReason == 0xB000


def test_none_stored_is_409_with_only_the_failed_sop_sequence() -> None:
    status, body = stow_response([], [_failed(), _failed(FailureReason.OUT_OF_RESOURCES)], study_retrieve_url=None)
    assert status == 409
    assert list(body) == ["00081190", "00081198"]
    dataset = _round_trip(body)
    assert "ReferencedSOPSequence" not in dataset
    assert [item.FailureReason for item in dataset.FailedSOPSequence] == [0xC000, 0xA700]


def test_nothing_at_all_is_409() -> None:
    assert stow_response([], [], study_retrieve_url=None)[0] == 409


def test_type_2_retrieve_urls_are_present_but_empty_when_unknown() -> None:
    _, body = stow_response([_stored()], [], study_retrieve_url=None)
    assert body["00081190"] == {"vr": "UR"}
    assert body["00081199"]["Value"][0]["00081190"] == {"vr": "UR"}
    dataset = _round_trip(body)
    assert dataset.RetrieveURL == ""
    assert dataset.ReferencedSOPSequence[0].RetrieveURL == ""


def test_an_unreadable_part_is_reported_with_empty_uids_and_its_reason() -> None:
    _, body = stow_response([], [_failed(FailureReason.CANNOT_UNDERSTAND, known=False)], study_retrieve_url=None)
    assert body["00081198"]["Value"] == [
        {"00081150": {"vr": "UI"}, "00081155": {"vr": "UI"}, "00081197": {"vr": "US", "Value": [0xC000]}}
    ]
    (item,) = _round_trip(body).FailedSOPSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == ("", "")


def test_keys_are_upper_case_tags_in_ascending_order_with_the_right_vrs() -> None:
    _, body = stow_response(
        [_stored(STUDY_URL, WarningReason.ELEMENTS_DISCARDED)], [_failed()], study_retrieve_url=STUDY_URL
    )
    text = json.dumps(body)
    assert json.loads(text) == body  # plain JSON types only (enum members encode as numbers)
    vrs = {"00081190": "UR", "00081198": "SQ", "00081199": "SQ"}
    assert {key: value["vr"] for key, value in body.items()} == vrs
    item_vrs = {"00081150": "UI", "00081155": "UI", "00081190": "UR", "00081196": "US"}
    (stored_item,) = body["00081199"]["Value"]
    assert {key: value["vr"] for key, value in stored_item.items()} == item_vrs
    (failed_item,) = body["00081198"]["Value"]
    assert {key: value["vr"] for key, value in failed_item.items()} == {
        "00081150": "UI",
        "00081155": "UI",
        "00081197": "US",
    }
    for mapping in (body, stored_item, failed_item):
        assert list(mapping) == sorted(mapping)
        assert all(len(key) == 8 and key == key.upper() for key in mapping)
    assert type(failed_item["00081197"]["Value"][0]) is int


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (e.DicomMalformedError("truncated"), 0xC000),
        (e.UnsupportedMediaTypeError("part"), 0xC000),
        (e.MalformedBodyError("unterminated multipart body"), 0xC000),
        (e.PayloadTooLargeError("more than 2000 parts"), 0xA700),
        (e.DicomUnsupportedError("transfer syntax"), 0xC122),
        (e.DicomNotAcceptedError("Modality"), 0x0122),
        (e.NoRouteError("no rule"), 0x0122),
        (e.StudyMismatchError("StudyInstanceUID"), 0xC409),
        (e.DicomTooLargeError("pixels"), 0xA700),
        (e.OutOfResourcesError("spool full"), 0xA700),
        (e.OverloadedError("queue full"), 0xA700),
        (e.DeadlineExceededError("late"), 0xA700),
        (e.ModelNotReadyError("loading"), 0xA700),
        (e.AuditUnavailableError("audit"), 0xA700),
        (e.DatabaseUnavailableError("db"), 0xA700),
        (e.InferenceFailedError("onnx"), 0x0110),
        (e.MedinferError("anything"), 0x0110),
        (RuntimeError("a bug"), 0x0110),
    ],
)
def test_each_error_maps_to_its_failure_reason(error: BaseException, reason: int) -> None:
    assert failure_reason(error) == reason


def test_a_subclass_inherits_its_bases_failure_reason() -> None:
    class SpoolFullError(e.OutOfResourcesError):
        pass

    assert failure_reason(SpoolFullError("disk")) == 0xA700


def test_every_failure_reason_is_in_a_range_ps3_18_table_i_2_2_defines() -> None:
    def defined(code: int) -> bool:
        return (
            code in {0x0110, 0x0122, 0xC122}
            or 0xA700 <= code <= 0xA7FF
            or 0xA900 <= code <= 0xA9FF
            or (0xC000 <= code <= 0xCFFF)
        )

    assert all(defined(code) for code in FAILURE_REASON_BY_ERROR.values())
    assert all(defined(code) for code in FailureReason)
    assert set(FAILURE_REASON_BY_ERROR) <= set(e.ALL_ERRORS)
