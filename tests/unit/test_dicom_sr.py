"""DICOM SR encoder: a real model version, a real chest CR and phantom studies in, Part 10 out."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import UID, Comprehensive3DSRStorage, ExplicitVRLittleEndian, generate_uid

from app.encoders.dicom_sr import PRIVATE_SCHEME, build_sr, device_uid, sr_bytes
from app.errors import DicomMalformedError, InvalidRequestError, StudyMismatchError
from app.inference.registry import ServedVersion, load_version
from app.inference.spec import load_spec
from app.postprocess.classification import Classification, classify
from training.dicom_studies import write_phantom_study

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "cxr-pneumonia"
PNEUMONIA = ("233604007", "SCT")
NORMAL = ("17621005", "SCT")


@pytest.fixture(scope="module")
def demo() -> ServedVersion:
    """The reference CXR model as shipped: not for clinical use."""
    spec = load_spec(MODEL_DIR)
    return load_version(spec, MODEL_DIR, spec.served_versions()[-1])


@pytest.fixture(scope="module")
def served(demo: ServedVersion) -> ServedVersion:
    """The same model as if released for clinical use: the only kind whose SR codes a finding."""
    return dataclasses.replace(demo, spec=demo.spec.model_copy(update={"not_for_clinical_use": False}))


@pytest.fixture
def chest_cr() -> Dataset:
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert path is not None, "pydicom-data is not installed"
    return pydicom.dcmread(path)


@pytest.fixture
def phantoms() -> list[Dataset]:
    """Two instances of one phantom study (distinct series), with pixel data."""
    study = generate_uid(entropy_srcs=["test_dicom_sr", "study"])
    return [
        write_phantom_study(None, seed=seed, positive=bool(seed % 2), rows=64, study_uid=study, modality=modality)
        for seed, modality in ((1, "CR"), (2, "DX"))
    ]


@pytest.fixture
def positive(served: ServedVersion) -> Classification:
    return classify(served.spec, [0.1875, 0.8125])


def _build(sources: list[Dataset], served: ServedVersion, classification: Classification) -> Dataset:
    sr = build_sr(sources, served, classification, request_id="req-0001", software_version="0.1.0")
    return pydicom.dcmread(io.BytesIO(sr_bytes(sr)))


def _report(ds: Dataset) -> hd.sr.MeasurementReport:
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def _group(ds: Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    groups = _report(ds).get_image_measurement_groups()
    assert len(groups) == 1
    return groups[0]


def _items(ds: Dataset) -> Iterator[Dataset]:
    stack = list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        yield item
        stack.extend(item.get("ContentSequence", []))


def _texts(ds: Dataset) -> list[str]:
    return [str(item.TextValue) for item in _items(ds) if item.ValueType == "TEXT"]


def _model_equipment(ds: Dataset) -> Dataset:
    items: list[Dataset] = [e for e in ds.ContributingEquipmentSequence if "DeviceUID" in e]
    assert len(items) == 1
    return items[0]


def test_sr_round_trips_as_comprehensive_3d_sr_in_the_source_study(
    chest_cr: Dataset, served: ServedVersion, positive: Classification
) -> None:
    ds = _build([chest_cr], served, positive)

    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == Comprehensive3DSRStorage == "1.2.840.10008.5.1.4.1.1.88.34"
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == chest_cr.StudyInstanceUID
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert ds[keyword].value == chest_cr[keyword].value, keyword
    assert ds.SeriesInstanceUID != chest_cr.SeriesInstanceUID
    assert ds.SOPInstanceUID != chest_cr.SOPInstanceUID
    assert (ds.SeriesNumber, ds.InstanceNumber) == (990, 1)
    assert "PixelData" not in ds


def test_sr_is_marked_unverified_preliminary_and_not_for_clinical_use(
    chest_cr: Dataset, demo: ServedVersion, positive: Classification
) -> None:
    ds = _build([chest_cr], demo, positive)

    assert demo.spec.not_for_clinical_use
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.PreliminaryFlag == "PRELIMINARY"
    assert ds.CompletionFlag == "COMPLETE"
    assert "VerifyingObserverSequence" not in ds
    assert "UNVERIFIED" in ds.SeriesDescription
    assert "NOT FOR CLINICAL USE" in ds.SeriesDescription
    assert "NOT FOR CLINICAL USE." in _texts(ds)
    assert "NOT FOR CLINICAL USE" in _model_equipment(ds).ContributionDescription


def test_request_id_and_intended_use_are_stated_in_the_content(
    chest_cr: Dataset, served: ServedVersion, positive: Classification
) -> None:
    texts = _texts(_build([chest_cr], served, positive))

    assert "Request ID: req-0001" in texts
    assert f"Intended use: {served.spec.intended_use}" in texts


def test_every_call_makes_a_new_series_and_instance(
    chest_cr: Dataset, served: ServedVersion, positive: Classification
) -> None:
    first = _build([chest_cr], served, positive)
    second = _build([chest_cr], served, positive)

    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID


def test_contributing_equipment_names_the_model_version_and_its_device_uid(
    chest_cr: Dataset, served: ServedVersion, positive: Classification
) -> None:
    equipment = _model_equipment(_build([chest_cr], served, positive))

    assert equipment.Manufacturer == "medinfer"
    assert equipment.ManufacturerModelName == "cxr-pneumonia"
    assert list(equipment.SoftwareVersions) == [served.version, "medinfer 0.1.0"]
    assert equipment.DeviceUID == device_uid(served)
    assert served.sha256 in equipment.ContributionDescription
    (purpose,) = equipment.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")  # Processing Equipment


def test_device_observer_is_the_model_version(
    chest_cr: Dataset, served: ServedVersion, positive: Classification
) -> None:
    (observer,) = _report(_build([chest_cr], served, positive)).get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes

    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == device_uid(served)
    assert attributes.name == attributes.model_name == "cxr-pneumonia"
    assert attributes.manufacturer_name == "medinfer"


def test_device_uid_is_stable_per_version_and_changes_with_version_or_file(served: ServedVersion) -> None:
    uid = device_uid(served)

    assert uid == device_uid(dataclasses.replace(served))
    assert UID(uid).is_valid
    assert len(uid) <= 64
    assert uid.startswith("2.25.")
    assert device_uid(dataclasses.replace(served, version=str(int(served.version) + 1))) != uid
    assert device_uid(dataclasses.replace(served, sha256="0" * 64)) != uid


def test_probability_measurement_is_the_positive_probability_and_highdicom_finds_it(
    chest_cr: Dataset, served: ServedVersion, positive: Classification
) -> None:
    group = _group(_build([chest_cr], served, positive))

    (measurement,) = group.get_measurements(name=codes.DCM.Probability)
    assert measurement.value == positive.probabilities["pneumonia"]
    assert (measurement.unit.value, measurement.unit.scheme_designator) == ("1", "UCUM")


@pytest.mark.parametrize(
    ("probabilities", "finding", "presence"),
    [
        ((0.1875, 0.8125), PNEUMONIA, codes.DCM.Present),
        ((0.8125, 0.1875), NORMAL, codes.DCM.Absent),
    ],
    ids=["positive", "negative"],
)
def test_finding_code_matches_the_decision(
    chest_cr: Dataset,
    served: ServedVersion,
    probabilities: tuple[float, float],
    finding: tuple[str, str],
    presence: hd.sr.CodedConcept,
) -> None:
    group = _group(_build([chest_cr], served, classify(served.spec, probabilities)))

    assert group.finding_type is not None
    assert (group.finding_type.value, group.finding_type.scheme_designator) == finding
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.name.scheme_designator) == PNEUMONIA
    assert evaluation.value == presence


def test_threshold_and_operating_point_are_algorithm_parameters(chest_cr: Dataset, served: ServedVersion) -> None:
    classification = classify(served.spec, [0.4, 0.6], "youden")
    texts = _texts(_build([chest_cr], served, classification))

    assert f"threshold={classification.threshold:g}" in texts
    assert "operating_point=youden" in texts
    assert f"sha256={served.sha256}" in texts


def test_every_source_instance_is_referenced(
    phantoms: list[Dataset], served: ServedVersion, positive: Classification
) -> None:
    ds = _build(phantoms, served, positive)
    expected = {str(p.SOPInstanceUID) for p in phantoms}

    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == expected
    assert "PertinentOtherEvidenceSequence" not in ds
    assert {str(i.referenced_sop_instance_uid) for i in _group(ds).source_images} == expected
    library = [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in _items(ds)
        if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "260753009"
    ]
    assert sorted(library) == sorted(expected)


def test_chest_sources_report_chest_imaging_as_the_procedure(
    phantoms: list[Dataset], served: ServedVersion, positive: Classification
) -> None:
    ds = _build(phantoms, served, positive)

    (procedure,) = [item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure.ConceptCodeSequence[0].CodeValue == "413815006"  # SCT Chest imaging


def test_sources_missing_optional_attributes_still_make_a_valid_sr(
    phantoms: list[Dataset], served: ServedVersion, positive: Classification
) -> None:
    sparse = phantoms[0]
    for keyword in (
        "PatientSex",
        "PatientBirthDate",
        "PatientName",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "BodyPartExamined",
        "PatientOrientation",
        "ImagerPixelSpacing",
        "Manufacturer",
        "SpecificCharacterSet",
    ):
        del sparse[keyword]

    ds = _build([sparse], served, positive)

    assert ds.StudyInstanceUID == sparse.StudyInstanceUID
    assert ds.PatientID == sparse.PatientID
    assert ds.PatientSex in ("", None)
    assert "PatientSex" not in sparse, "the source must not be modified"
    assert _group(ds).get_measurements(name=codes.DCM.Probability)


def test_sources_from_two_studies_are_refused(
    chest_cr: Dataset, phantoms: list[Dataset], served: ServedVersion, positive: Classification
) -> None:
    with pytest.raises(StudyMismatchError, match="more than one study"):
        build_sr([*phantoms, chest_cr], served, positive, request_id="r", software_version="0.1.0")


def test_sources_of_two_patients_in_one_study_are_refused(
    phantoms: list[Dataset], served: ServedVersion, positive: Classification
) -> None:
    phantoms[1].PatientID = "SOMEONE-ELSE"

    with pytest.raises(StudyMismatchError, match="more than one patient") as raised:
        build_sr(phantoms, served, positive, request_id="r", software_version="0.1.0")
    assert "SOMEONE-ELSE" not in str(raised.value), "the detail must not carry PHI"


def test_no_sources_or_a_source_without_uids_is_refused(
    phantoms: list[Dataset], served: ServedVersion, positive: Classification
) -> None:
    with pytest.raises(InvalidRequestError):
        build_sr([], served, positive, request_id="r", software_version="0.1.0")
    del phantoms[1].SOPInstanceUID
    with pytest.raises(DicomMalformedError, match="source instance 1 lacks SOPInstanceUID"):
        build_sr(phantoms, served, positive, request_id="r", software_version="0.1.0")


def test_unknown_labels_get_a_declared_private_code(chest_cr: Dataset, served: ServedVersion) -> None:
    spec = served.spec.model_copy(update={"labels": ("clear", "opacity"), "positive_label": "opacity"})
    other = dataclasses.replace(served, spec=spec)
    ds = _build([chest_cr], other, classify(spec, [0.25, 0.75]))

    finding = _group(ds).finding_type
    assert finding is not None
    assert (finding.value, finding.scheme_designator) == ("opacity", PRIVATE_SCHEME)
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == [PRIVATE_SCHEME]


def test_standard_labels_declare_no_private_scheme(
    chest_cr: Dataset, served: ServedVersion, positive: Classification
) -> None:
    assert "CodingSchemeIdentificationSequence" not in _build([chest_cr], served, positive)


def test_models_without_a_positive_label_report_the_decided_label(chest_cr: Dataset, served: ServedVersion) -> None:
    spec = served.spec.model_copy(update={"positive_label": None, "thresholds": None})
    other = dataclasses.replace(served, spec=spec)
    classification = classify(spec, [0.75, 0.25])
    group = _group(_build([chest_cr], other, classification))

    assert group.finding_type is not None
    assert (group.finding_type.value, group.finding_type.scheme_designator) == NORMAL
    (measurement,) = group.get_measurements(name=codes.DCM.Probability)
    assert measurement.value == 0.75
    assert group.get_qualitative_evaluations() == []


def test_text_outside_the_sources_character_set_switches_the_sr_to_utf8(
    chest_cr: Dataset, served: ServedVersion, positive: Classification
) -> None:
    intended_use = "Démonstration — engineering only (≠ clinical)"
    other = dataclasses.replace(served, spec=served.spec.model_copy(update={"intended_use": intended_use}))
    ds = _build([chest_cr], other, positive)

    assert chest_cr.SpecificCharacterSet == "ISO_IR 100"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert f"Intended use: {intended_use}" in _texts(ds)
    assert ds.PatientName == chest_cr.PatientName


def test_ascii_text_keeps_the_sources_character_set(
    chest_cr: Dataset, served: ServedVersion, positive: Classification
) -> None:
    assert _build([chest_cr], served, positive).SpecificCharacterSet == chest_cr.SpecificCharacterSet


def test_a_demonstration_model_codes_no_finding_and_no_presence(
    chest_cr: Dataset, demo: ServedVersion, positive: Classification
) -> None:
    ds = _build([chest_cr], demo, positive)
    group = _group(ds)

    assert group.finding_type is None
    assert group.get_qualitative_evaluations() == []
    (measurement,) = group.get_measurements(name=codes.DCM.Probability)
    assert measurement.value == positive.probabilities["pneumonia"]
    assert "Model output, not a finding: pneumonia (probability of pneumonia 0.812, threshold 0.6049)." in _texts(ds)
