"""Predictions as DICOM Comprehensive 3D SR for the PACS, after IHE AI Results (AIR).

The document is a TID 1500 Measurement Report in the study of its source images, in a series
of its own. It is marked the way AI output must be: VerificationFlag ``UNVERIFIED`` and
PreliminaryFlag ``PRELIMINARY`` (nobody has reviewed it), with the model named as a device
observer (TID 1004) and as Contributing Equipment (PS3.3 C.12.1.1.6) carrying a Device UID that
changes with every model version. CompletionFlag is ``COMPLETE``: the flag says whether the
content is all there is (PS3.3 C.17.2.3), not whether a person signed it off, and the model
adds nothing later.

One TID 1501 measurement group carries the result:

- Finding (DCM 121071): the decision as a code (:func:`finding_code`);
- Probability (DCM 122157), unit ``1`` (UCUM "no units"): the positive label's probability,
  or the decided label's for models without a positive label;
- a CODE qualitative evaluation "<positive label>: Present/Absent" for thresholded models;
- a model whose card says "not for clinical use" codes no finding: no Finding and no
  Present/Absent, its decision only as text ("model output, not a finding"), so no PACS or
  viewer files a demonstration model's output as a coded finding;
- for an image outside the model's validated input, instead: Finding "Indeterminate" (SCT
  82334004), the detector's score as the measurement, no probability and no Present/Absent,
  and a comment giving the score, the threshold and the reasons;
- Algorithm Identification (TID 4019) with the threshold, operating point and sha256;
- TEXT comments (DCM 121106): "NOT FOR CLINICAL USE", the intended use, the request id.

Building is pure CPU work; callers run it off the event loop.
"""

from __future__ import annotations

import copy
import io
import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final, cast

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DT

from app.errors import DicomMalformedError, InvalidRequestError, StudyMismatchError
from app.inference.registry import ServedVersion
from app.inference.spec import ModelSpec
from app.postprocess.classification import Classification

NOT_FOR_CLINICAL_USE: Final = "NOT FOR CLINICAL USE"
#: Private coding scheme (PS3.16 8.2: "99" prefix) for labels without a standard code.
PRIVATE_SCHEME: Final = "99MEDINFER"

#: Labels of served models with a standard meaning. Any other label gets a private code.
FINDING_CODES: Final[dict[str, Code]] = {
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "normal": codes.SCT.Normal,  # 17621005
}
#: BodyPartExamined -> procedure reported (CID 100 allows any imaging procedure).
_PROCEDURES: Final[dict[str, Code]] = {"CHEST": codes.SCT.ChestImaging}  # 413815006
_DEFAULT_PROCEDURE: Final[Code] = codes.SCT.ImagingProcedure  # 363679005

#: Type 2 Patient and General Study attributes highdicom reads from the first source.
_TYPE2_KEYWORDS: Final = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_REQUIRED_KEYWORDS: Final = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_PATIENT_SEX_VALUES: Final = frozenset({"M", "F", "O"})
#: Groups from here on hold bulk data (overlays, pixel data) that an SR header never needs.
_FIRST_BULK_GROUP: Final = 0x5000
_LO_MAX: Final = 64
_UT_MAX: Final = 1024
_UTF8: Final = "ISO_IR 192"
_DEVICE_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medinfer:model-device")
_MODALITY_CODES: Final[dict[str, Code]] = {
    getattr(codes.cid33, name).value: getattr(codes.cid33, name) for name in codes.cid33.dir()
}
_COMMENT: Final[Code] = codes.DCM.Comment  # 121106
#: The finding of an image the model cannot stand behind (SNOMED CT qualifier value).
INDETERMINATE_FINDING: Final = Code("82334004", "SCT", "Indeterminate")
#: The detector's score: no standard concept names it, so it has a private code.
OOD_SCORE: Final = Code("ood-score", PRIVATE_SCHEME, "Out-of-distribution score")
_PIXELS: Final = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")


def device_uid(served: ServedVersion) -> str:
    """The model version's Device UID: the same for the same name, version and file.

    A name-based UUID (RFC 4122 version 5) under ``2.25`` (PS3.5 B.2), so a PACS can group
    results by the exact model that made them, and a retrained file under the same version
    number still gets a new UID.
    """
    name = f"{served.spec.name}\n{served.version}\n{served.sha256}"
    return f"2.25.{uuid.uuid5(_DEVICE_NAMESPACE, name).int}"


def finding_code(label: str) -> hd.sr.CodedConcept:
    """The coded concept for a model label: SNOMED CT where known, else ``(99MEDINFER, label)``."""
    known = FINDING_CODES.get(label.lower())
    if known is not None:
        return hd.sr.CodedConcept.from_code(known)
    return hd.sr.CodedConcept(label, PRIVATE_SCHEME, label[:_LO_MAX])


def build_sr(
    sources: Sequence[Dataset],
    served: ServedVersion,
    classification: Classification,
    *,
    request_id: str,
    series_number: int = 990,
    instance_number: int = 1,
    manufacturer: str = "medinfer",
    software_version: str,
    extra_items: Sequence[hd.sr.ContentItem] = (),
    extra_evidence: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR of one classification of ``sources``, in their study.

    ``extra_items`` are appended to the measurement group, e.g. the reference to a saliency
    map (:func:`app.encoders.saliency.sr_reference`); ``extra_evidence`` are the instances they
    reference, made for the same request (the map), listed in Current Requested Procedure
    Evidence beside the sources, since every instance the content tree references must be
    listed there (PS3.3 C.17.2.3) and IHE AIR lists the AI result objects it produced.

    Raises :class:`InvalidRequestError` when ``sources`` is empty, :class:`DicomMalformedError`
    when a source lacks a UID the references need, and :class:`StudyMismatchError` when the
    sources or the extra evidence span studies or patients. Pixel data is never copied.
    """
    headers = _headers(sources)
    evidence = _headers([*headers, *extra_evidence])
    spec = served.spec
    device = device_uid(served)
    algorithm = hd.sr.AlgorithmIdentification(
        name=spec.name,
        version=served.version,
        parameters=_parameters(served, classification),
        manufacturer=manufacturer,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{spec.name} v{served.version}"),
        finding_type=_finding(spec, classification),
        algorithm_id=algorithm,
        measurements=_measurements(classification),
        qualitative_evaluations=[] if spec.not_for_clinical_use else _presence(classification),
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in headers
        ],
    )
    group[0].ContentSequence.extend(_comments(served, classification, request_id))
    group[0].ContentSequence.extend(extra_items)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device, name=spec.name, manufacturer_name=manufacturer, model_name=spec.name
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_procedure(headers),
        imaging_measurements=[group],
    )
    root = report[0].ContentSequence
    root.insert(len(root) - 1, _image_library(headers))  # TID 1500 row 5, before the measurements
    private = [] if _all_standard(served) and not classification.indeterminate else [_private_scheme()]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[model_equipment(served, device, manufacturer, software_version)],
        series_description=_series_description(served),
        manufacturer_model_name=manufacturer,
        software_versions=software_version,
        coding_schemes=private or None,
        specific_character_set=_character_set(headers[0], served, request_id, manufacturer, software_version),
    )


def sr_bytes(sr: Dataset) -> bytes:
    """DICOM Part 10 bytes (preamble, File Meta, Explicit VR Little Endian) for C-STORE and STOW.

    Sets the File Meta transfer syntax to Explicit VR Little Endian, which every SR receiver
    must accept; the documents :func:`build_sr` makes already have it.
    """
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _headers(sources: Sequence[Dataset]) -> list[Dataset]:
    """Header-only copies, one per distinct instance, checked to share one study and patient.

    Copies keep highdicom from holding pixel data, and give absent Type 2 attributes (PS3.3
    C.7.1.1, C.7.2.1) an empty value, which highdicom needs and the SR IOD allows.
    """
    if not sources:
        raise InvalidRequestError("an SR needs at least one source instance")
    headers: dict[str, Dataset] = {}
    for index, source in enumerate(sources):
        missing = [kw for kw in _REQUIRED_KEYWORDS if not source.get(kw)]
        if missing:
            raise DicomMalformedError(f"source instance {index} lacks {', '.join(missing)}")
        headers.setdefault(str(source.SOPInstanceUID), source_header(source))
    found = list(headers.values())
    if len({str(h.StudyInstanceUID) for h in found}) > 1:
        raise StudyMismatchError("the source instances belong to more than one study (StudyInstanceUID)")
    if len({str(h.PatientID or "") for h in found}) > 1:
        raise StudyMismatchError("the source instances belong to more than one patient (PatientID)")
    return found


def source_header(source: Dataset) -> Dataset:
    """The source's attributes without its bulk data, with the Type 2 ones highdicom needs: the
    header every object medinfer derives from an image (the SR, the saliency map) is built from."""
    header = Dataset()
    for element in source:
        if element.tag.group < _FIRST_BULK_GROUP:
            header.add(copy.deepcopy(element))
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, None)
    if header.PatientSex not in _PATIENT_SEX_VALUES:
        header.PatientSex = None  # an invalid enumerated value cannot be carried over
    return header


def _character_set(first: Dataset, served: ServedVersion, *texts: str) -> str | list[str] | None:
    """The first source's Specific Character Set, unless text this module adds needs UTF-8.

    Patient and study values are decoded by pydicom, so they re-encode in either; a PACS that
    stored the images in their character set can read the SR in it too.
    """
    ours = (*texts, served.spec.intended_use, *served.spec.labels)
    if all(text.isascii() for text in ours):
        charset = first.get("SpecificCharacterSet")
        return None if charset is None else cast(str | list[str], charset)
    return _UTF8


def _finding(spec: ModelSpec, classification: Classification) -> hd.sr.CodedConcept | None:
    """The coded finding: Indeterminate outside the validated input; none for a demonstration
    model (its output is text only); else the decided label's code."""
    if classification.indeterminate:
        return hd.sr.CodedConcept.from_code(INDETERMINATE_FINDING)
    if spec.not_for_clinical_use:
        return None
    return finding_code(classification.label)


def _measurements(classification: Classification) -> list[hd.sr.Measurement]:
    """The probability of a decided image; the detector's score (and no probability) otherwise."""
    ood = classification.ood
    if classification.indeterminate and ood is not None:
        if ood.score is None or not math.isfinite(ood.score):
            return []
        return [
            hd.sr.Measurement(name=hd.sr.CodedConcept.from_code(OOD_SCORE), value=ood.score, unit=codes.UCUM.NoUnits)
        ]
    return [
        hd.sr.Measurement(
            name=codes.DCM.Probability, value=_reported_probability(classification), unit=codes.UCUM.NoUnits
        )
    ]


def _decision_text(classification: Classification) -> str:
    label = classification.positive_label or classification.label
    text = f"{classification.label} (probability of {label} {classification.probabilities[label]:.3f}"
    if classification.threshold is not None:
        text += f", threshold {classification.threshold:g}"
    return text + ")"


def _reported_probability(classification: Classification) -> float:
    label = classification.positive_label or classification.label
    return classification.probabilities[label]


def _parameters(served: ServedVersion, classification: Classification) -> list[str]:
    parameters = [f"sha256={served.sha256}"]
    ood = classification.ood
    if ood is not None and ood.threshold is not None:
        parameters.append(f"ood_threshold={ood.threshold:g}")
    if classification.threshold is not None:
        parameters.append(f"threshold={classification.threshold:g}")
    if classification.operating_point is not None:
        parameters.append(f"operating_point={classification.operating_point}")
    return parameters


def _presence(classification: Classification) -> list[hd.sr.QualitativeEvaluation]:
    if classification.positive_label is None or classification.positive is None or classification.indeterminate:
        return []
    value = codes.DCM.Present if classification.positive else codes.DCM.Absent  # 121053 / 121054
    return [hd.sr.QualitativeEvaluation(name=finding_code(classification.positive_label), value=value)]


def _comments(served: ServedVersion, classification: Classification, request_id: str) -> list[hd.sr.TextContentItem]:
    spec = served.spec
    texts = [f"{NOT_FOR_CLINICAL_USE}."] if spec.not_for_clinical_use else []
    if classification.indeterminate and classification.ood is not None:
        texts.append(classification.ood.summary()[:_UT_MAX])
    elif spec.not_for_clinical_use:
        texts.append(f"Model output, not a finding: {_decision_text(classification)}.")
    texts += [
        f"AI result, not reviewed by a physician: {spec.name} v{served.version}.",
        f"Intended use: {spec.intended_use}",
        f"Request ID: {request_id}",
    ]
    return [
        hd.sr.TextContentItem(name=_COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for text in texts
    ]


def _procedure(headers: Sequence[Dataset]) -> Code:
    body_parts = {str(h.get("BodyPartExamined", "")).upper() for h in headers}
    if len(body_parts) == 1:
        return _PROCEDURES.get(body_parts.pop(), _DEFAULT_PROCEDURE)
    return _DEFAULT_PROCEDURE


def _image_library(headers: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one entry per source (TID 1601).

    highdicom's own ``ImageLibrary`` needs every projection-radiography descriptor (Imager
    Pixel Spacing, Patient Orientation) and refuses images without them; the descriptors are
    optional in TID 1602, so each is written only where the image has it.
    """
    entries = []
    for header in headers:
        entry = hd.sr.ImageContentItem(
            name=codes.SCT.Source,
            referenced_sop_class_uid=str(header.SOPClassUID),
            referenced_sop_instance_uid=str(header.SOPInstanceUID),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        entry.ContentSequence = hd.sr.ContentSequence(_descriptors(header))
        entries.append(entry)
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence(entries)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _descriptors(header: Dataset) -> list[hd.sr.ContentItem]:
    acquisition = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    items: list[hd.sr.ContentItem] = []
    modality = _MODALITY_CODES.get(str(header.get("Modality", "")))
    if modality is not None:
        items.append(hd.sr.CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=acquisition))
    for concept, keyword in ((codes.DCM.PixelDataRows, "Rows"), (codes.DCM.PixelDataColumns, "Columns")):
        if header.get(keyword):
            value = int(header[keyword].value)
            items.append(hd.sr.NumContentItem(name=concept, value=value, unit=_PIXELS, relationship_type=acquisition))
    orientation = header.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2:  # noqa: PLR2004 - row and column
        for concept, value in zip(
            (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn), orientation, strict=True
        ):
            items.append(hd.sr.TextContentItem(name=concept, value=str(value), relationship_type=acquisition))
    spacing = header.get("ImagerPixelSpacing")
    if spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing):  # noqa: PLR2004
        # Imager Pixel Spacing is (row spacing, column spacing): vertical first (PS3.3 10.7.1.3).
        for concept, value in (
            (codes.DCM.HorizontalPixelSpacing, spacing[1]),
            (codes.DCM.VerticalPixelSpacing, spacing[0]),
        ):
            items.append(
                hd.sr.NumContentItem(
                    name=concept, value=float(value), unit=codes.UCUM.Millimeter, relationship_type=acquisition
                )
            )
    return items


def model_equipment(
    served: ServedVersion, device: str, manufacturer: str, software_version: str
) -> hd.ContributingEquipment:
    """The IHE AIR Contributing Equipment item: the model version as processing equipment."""
    spec = served.spec
    warning = f"{NOT_FOR_CLINICAL_USE}. " if spec.not_for_clinical_use else ""
    equipment = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,  # 109102
        manufacturer_model_name=spec.name,
        software_versions=[served.version, f"{manufacturer} {software_version}"[:_LO_MAX]],
        contribution_datetime=DT(datetime.now(UTC)),
        contribution_description=f"{warning}AI model {spec.name} v{served.version}, sha256 {served.sha256}",
    )
    equipment.DeviceUID = device
    return equipment


def _series_description(served: ServedVersion) -> str:
    warning = f" {NOT_FOR_CLINICAL_USE}" if served.spec.not_for_clinical_use else ""
    return f"AI result (UNVERIFIED){warning} {served.spec.name} v{served.version}"[:_LO_MAX]


def _all_standard(served: ServedVersion) -> bool:
    return all(label.lower() in FINDING_CODES for label in served.spec.labels)


def _private_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="medinfer model labels",
        responsible_organization="medinfer",
    )
