"""Synthetic chest-radiograph DICOM studies from the phantom generator. numpy + pydicom only.

``write_phantom_study`` makes a valid DICOM Part 10 file (CR Image Storage or Digital
X-Ray Image Storage - For Presentation) from a seeded phantom, at any size, bit depth
(8..16), photometric interpretation and transfer syntax (uncompressed, RLE Lossless,
JPEG 2000 Lossless, JPEG-LS Lossless). Encoding uses pydicom's own encoders: RLE is built
in (or pylibjpeg-rle), JPEG 2000 needs pylibjpeg-openjpeg, JPEG-LS needs pyjpegls.

``reference_preprocess`` is the executable form of the ``[preprocessing]`` table in
``models/cxr-pneumonia/model.toml``: modality LUT, VOI (window) to [0, 1], MONOCHROME1
inversion, antialiased bilinear resize to 224 x 224. The service's own DICOM preprocessor
should agree with it (Pillow's ``Image.resize(..., BILINEAR)`` on a mode "F" image uses
the same filter).

UIDs are derived deterministically from the arguments (pydicom's ``generate_uid`` with
entropy sources), so the same call writes the same bytes.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from training import phantoms

__all__ = [
    "SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "phantom_dataset",
    "reference_preprocess",
    "resize_bilinear_antialias",
    "write_phantom_study",
]

SOP_CLASSES: dict[str, UID] = {
    "CR": ComputedRadiographyImageStorage,  # 1.2.840.10008.5.1.4.1.1.1
    "DX": DigitalXRayImageStorageForPresentation,  # 1.2.840.10008.5.1.4.1.1.1.1
}

TRANSFER_SYNTAXES: dict[str, UID] = {
    "ExplicitVRLittleEndian": ExplicitVRLittleEndian,
    "RLELossless": RLELossless,
    "JPEG2000Lossless": JPEG2000Lossless,
    "JPEGLSLossless": JPEGLSLossless,
}

_FIELD_OF_VIEW_MM = 430.0  # a 43 cm detector


def _syntax(ts: str) -> UID:
    if ts in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[ts]
    for uid in TRANSFER_SYNTAXES.values():
        if ts == uid:
            return uid
    raise ValueError(f"unsupported transfer syntax {ts!r}; use one of {sorted(TRANSFER_SYNTAXES)}")


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=["medinfer-phantom", *(str(p) for p in parts)])


def phantom_dataset(  # noqa: PLR0915 - a flat list of DICOM attributes
    *,
    seed: int,
    positive: bool,
    rows: int = 512,
    columns: int | None = None,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    modality: str = "CR",
    transfer_syntax: str = "ExplicitVRLittleEndian",
    patient_id: str = "PHANTOM0001",
    patient_name: str = "Phantom^Chest",
    patient_sex: str = "O",
    patient_birth_date: str = "19700101",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    accession_number: str = "",
    study_date: str = "20260101",
    study_time: str = "120000",
    view_position: str = "PA",
    body_part: str = "CHEST",
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    window: bool = True,
) -> Dataset:
    """Build the phantom study as a pydicom Dataset (with file meta), without writing it."""
    columns = rows if columns is None else columns
    if not 8 <= bits_stored <= 16:
        raise ValueError("bits_stored must be within 8..16")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    if modality not in SOP_CLASSES:
        raise ValueError("modality must be CR or DX")
    if rescale_slope <= 0:
        raise ValueError("rescale_slope must be > 0")
    ts = _syntax(transfer_syntax)

    img = phantoms.generate(seed, positive, rows, columns)  # [0, 1], bright = dense
    max_value = (1 << bits_stored) - 1
    stored = np.rint(img.astype(np.float64) * max_value)
    if photometric == "MONOCHROME1":
        stored = max_value - stored  # MONOCHROME1: low values display bright
    arr = stored.astype(np.uint8 if bits_stored == 8 else np.uint16)

    key = (seed, bool(positive), rows, columns, bits_stored, photometric, modality, str(ts), patient_id)
    study_uid = study_uid or _uid("study", patient_id, seed)
    series_uid = series_uid or _uid("series", study_uid, modality)
    sop_uid = sop_instance_uid or _uid("instance", *key, study_uid)
    sop_class = SOP_CLASSES[modality]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDINFER_PHANTOM"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = "medinfer"
    ds.ManufacturerModelName = "synthetic chest phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST PA (synthetic phantom)"
    ds.SeriesDescription = "Synthetic chest radiograph phantom"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["L", "F"]  # PA: columns run to the patient's left, rows to the feet
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = f"Synthetic phantom, not a patient. seed={seed} positive={bool(positive)}"
    spacing = [_FIELD_OF_VIEW_MM / rows, _FIELD_OF_VIEW_MM / columns]
    ds.ImagerPixelSpacing = [f"{v:.6g}" for v in spacing]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
        ds.RescaleType = "US"

    ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
    ds.RescaleSlope = f"{rescale_slope:.10g}"
    ds.RescaleIntercept = f"{rescale_intercept:.10g}"
    if window:
        # In rescaled units; with the DICOM LINEAR function this maps the full stored
        # range 0..2^bits-1 exactly onto the output range.
        ds.WindowCenter = f"{rescale_slope * (1 << (bits_stored - 1)) + rescale_intercept:.10g}"
        ds.WindowWidth = f"{rescale_slope * (1 << bits_stored):.10g}"
        ds.VOILUTFunction = "LINEAR"
        ds.WindowCenterWidthExplanation = "FULL RANGE"
    ds.LossyImageCompression = "00"
    if ts != ExplicitVRLittleEndian:
        ds.compress(ts, generate_instance_uid=False)
    return ds


def write_phantom_study(path_or_buffer: str | os.PathLike[str] | BinaryIO | None, **kwargs: object) -> Dataset:
    """Write a phantom chest study as DICOM Part 10 and return the Dataset.

    Keyword arguments are those of ``phantom_dataset``: seed, positive, rows, columns,
    bits_stored (8..16), photometric ("MONOCHROME1"/"MONOCHROME2"), modality ("CR"/"DX"),
    transfer_syntax ("ExplicitVRLittleEndian", "RLELossless", "JPEG2000Lossless",
    "JPEGLSLossless" or their UIDs), patient_id, patient_name, study_uid, series_uid,
    sop_instance_uid, accession_number, study_date, rescale_slope, rescale_intercept, window.
    ``path_or_buffer`` may be None to skip writing.
    """
    ds = phantom_dataset(**kwargs)  # type: ignore[arg-type]
    if path_or_buffer is not None:
        ds.save_as(path_or_buffer, enforce_file_format=True)
    return ds


def study_bytes(**kwargs: object) -> bytes:
    buf = io.BytesIO()
    write_phantom_study(buf, **kwargs)
    return buf.getvalue()


# ----------------------------------------------------------------- reference preprocessing


def _linear_window(x: np.ndarray, center: float, width: float, exact: bool) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 LINEAR / LINEAR_EXACT window, output in [0, 1]."""
    if exact:
        if width <= 0:
            raise ValueError("window width must be > 0")
        return np.clip((x - (center - width / 2.0)) / width, 0.0, 1.0)
    if width < 1:
        raise ValueError("window width must be >= 1 for LINEAR")
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(v: object) -> float:
    try:
        return float(v[0])  # type: ignore[index]
    except TypeError:
        return float(v)  # type: ignore[arg-type]


def voi_to_unit(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """Rescaled values -> [0, 1].

    Precedence: the first Window Center/Width (VOI LUT Function LINEAR, LINEAR_EXACT or
    SIGMOID); else the first item of a VOI LUT Sequence (table lookup, output divided by
    2^bits - 1 from its LUT Descriptor); else the image's own min-max.
    """
    x = values.astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        fn = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if fn == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        return _linear_window(x, c, w, exact=fn == "LINEAR_EXACT")
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        n_entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
        n_entries = n_entries or 65536
        lut = np.asarray(item.LUTData, dtype=np.float64).ravel()[:n_entries]
        idx = np.clip(np.rint(x) - first_mapped, 0, len(lut) - 1).astype(np.int64)
        return np.clip(lut[idx] / float((1 << bits) - 1), 0.0, 1.0)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row-stochastic [n_out, n_in] weights of Pillow's antialiased BILINEAR resampling."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        k = 1.0 - np.abs((j - center + 0.5) / support)
        k = np.clip(k, 0.0, None)
        s = k.sum()
        if s > 0:
            w[i, lo:hi] = k / s
    return w


def resize_bilinear_antialias(img: np.ndarray, rows: int, columns: int | None = None) -> np.ndarray:
    """Separable triangle-filter resize (Pillow BILINEAR semantics, antialiased when shrinking)."""
    columns = rows if columns is None else columns
    h, w = img.shape
    out = img.astype(np.float64)
    if (h, w) == (rows, columns):
        return out
    return _resample_matrix(h, rows) @ out @ _resample_matrix(w, columns).T


def reference_preprocess(ds: Dataset, size: int = 224) -> np.ndarray:
    """DICOM -> model input float32 [1, 1, size, size] in [0, 1], bright = dense.

    1. decode stored values (pixel_array); 2. modality LUT (Rescale Slope/Intercept or a
    Modality LUT Sequence); 3. VOI to [0, 1]: first window (LINEAR default), else first
    VOI LUT Sequence item, else min-max; 4. MONOCHROME1: x -> 1 - x; 5. resize to size x size with
    antialiased bilinear resampling (aspect ratio not preserved). The network standardises
    each image itself, so nothing else is applied.
    """
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise ValueError("expected a single-frame monochrome image")
    rescaled = apply_modality_lut(arr, ds)
    unit = voi_to_unit(ds, np.asarray(rescaled, dtype=np.float64))
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":
        unit = 1.0 - unit
    out = resize_bilinear_antialias(unit, size, size)
    return np.clip(out, 0.0, 1.0).astype(np.float32)[None, None]
