"""Saliency maps (class activation maps) as DICOM a PACS can overlay, and as a PNG for a browser.

**Why a fractional Segmentation, not a Parametric Map.** A Parametric Map is the object the
standard designs for a real-valued map (its Real World Value Mapping can even name the quantity
DCM 130402 "Class activation", CID 217 "Visual Explanation" within CID 7180), and OHIF 3.9+
overlays it. But the Parametric Map IOD makes the Frame of Reference module Mandatory (PS3.3
A.75.3), and projection radiographs have none: CR images have no Frame of Reference module at
all, DX images rarely carry one, and neither has an Image Plane module that would place the map
in patient space; highdicom 0.28 refuses to build one for such a source. The Segmentation IOD
allows a Segmentation without a Frame of Reference when each frame corresponds pixel for pixel
to the image it references (PS3.3 A.51.5.1, C.8.20.2), which is exactly a map resampled to the
source's Rows x Columns; and Segmentation overlays are what PACS viewers, OHIF and 3D Slicer
display most widely. So the map is a FRACTIONAL Segmentation, SegmentationFractionalType
PROBABILITY, 8-bit (0..255 for 0..1), one segment whose property type is DCM 130402 "Class
activation" (category SCT 309825002 "Spatial and relational concept"), so no viewer reads it as
a lesion outline; its description says the values are a normalised activation, not a probability.

**Geometry.** The model saw the image resized to 224 x 224 without keeping the aspect ratio
(``[preprocessing]`` in model.toml), so the map's cells span the whole image in both axes; it is
resampled straight from the model's grid (7 x 7 for the reference CNN) to the source's Rows x
Columns with half-pixel-centre bilinear interpolation (Pillow's BILINEAR), then divided by its
maximum, so values lie in [0, 1] (all zero when the model found no evidence at all). The
Segmentation references the source instance per frame (Derivation Image Sequence, Spatial
Locations Preserved YES), has the source's Rows x Columns, and carries a Frame of Reference and
Pixel Measures only where the source has a plane geometry (see :func:`_projection_header`).

**Marking.** The model version is Contributing Equipment with the same Device UID as the SR
(:func:`app.encoders.dicom_sr.device_uid`); Series Description, Content Label and Description
and the segment's description say "AI saliency map", "UNVERIFIED" (a Segmentation has no
Verification Flag, so the text carries it) and "NOT FOR CLINICAL USE" where the model card says
so.

Everything here is pure CPU work; callers run it off the event loop.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Final

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from app.encoders.dicom_sr import NOT_FOR_CLINICAL_USE, device_uid, model_equipment, source_header
from app.errors import DicomMalformedError, InferenceFailedError
from app.inference.registry import ServedVersion

#: The segment's property: a class activation (PS3.16 CID 217 "Visual Explanation").
CLASS_ACTIVATION: Final[Code] = codes.DCM.ClassActivation  # 130402
#: Neither anatomy nor a finding, so no viewer files it as a lesion.
SPATIAL_CONCEPT: Final[Code] = codes.SCT.SpatialAndRelationalConcept  # 309825002
SEGMENT_NUMBER: Final = 1
CONTENT_LABEL: Final = "AI_SALIENCY"
#: 8-bit fractional values: 0..255 stand for 0..1 (PS3.3 C.8.20.2.3).
MAX_FRACTIONAL_VALUE: Final = 255
#: Overlay opacity at the map's peak; zero activation leaves the grey image untouched.
OVERLAY_ALPHA: Final = 0.55
#: Anchors of the overlay's colour scale (dark blue, cyan, yellow, red), evenly spaced in [0, 1].
_COLOURS: Final = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [230, 0, 0]], dtype=np.float64)
_REQUIRED: Final = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
_LO_MAX: Final = 64


def resample_map(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """One image's map, resampled to ``rows x columns`` and divided by its maximum: float32 in [0, 1].

    ``cam`` is the model's map for one image, ``[h, w]`` (a leading axis of 1 is accepted).
    Half-pixel-centre bilinear resampling (Pillow BILINEAR on a mode "F" image) keeps cell
    ``(i, j)`` centred on the same part of the image whatever the target size, since the model
    saw the whole image stretched to its square input. Raises :class:`InferenceFailedError`
    when the map is not a finite 2-D array: that is a broken model output, not a bad request.
    """
    grid = np.asarray(cam, dtype=np.float32)
    if grid.ndim == 3 and grid.shape[0] == 1:  # noqa: PLR2004 - one image's row of a batch
        grid = grid[0]
    if grid.ndim != 2 or grid.size == 0:  # noqa: PLR2004 - rows x columns
        raise InferenceFailedError(f"the saliency output must be one 2-D map per image, got shape {grid.shape}")
    if not np.isfinite(grid).all():
        raise InferenceFailedError("the saliency output holds NaN or infinite values")
    grid = np.maximum(grid, 0.0)
    resized = np.asarray(Image.fromarray(grid).resize((columns, rows), Image.Resampling.BILINEAR))
    peak = float(resized.max())
    if peak <= 0.0:
        return np.zeros((rows, columns), dtype=np.float32)
    return np.clip(resized / peak, 0.0, 1.0).astype(np.float32)


def saliency_map(
    source: Dataset,
    cam: np.ndarray,
    served: ServedVersion,
    *,
    series_number: int,
    software_version: str,
    instance_number: int = 1,
    manufacturer: str = "medinfer",
) -> hd.seg.Segmentation:
    """The map of one source image as a fractional Segmentation in the source's study.

    ``cam`` is the model's map for that image (``[h, w]``, any non-negative scale). The result
    has the source's Rows x Columns, its own series, and references the source instance. Raises
    :class:`DicomMalformedError` when the source lacks a UID or its size, and
    :class:`InferenceFailedError` when ``cam`` is not a finite 2-D map. Pixel data of the source
    is never copied.
    """
    missing = [kw for kw in _REQUIRED if not source.get(kw)]
    if missing:
        raise DicomMalformedError(f"the source instance lacks {', '.join(missing)}")
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomMalformedError("a saliency map needs a single-frame source image")
    header = _projection_header(source)
    rows, columns = int(source.Rows), int(source.Columns)
    fractions = resample_map(cam, rows, columns)
    spec = served.spec
    warning = f" {NOT_FOR_CLINICAL_USE}" if spec.not_for_clinical_use else ""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=spec.name,
        family=codes.DCM.ArtificialIntelligence,
        version=served.version,
        source=manufacturer,
        parameters={"method": "class activation map", "sha256": served.sha256},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=f"AI saliency: {spec.positive_label or spec.name}"[:_LO_MAX],
        segmented_property_category=SPATIAL_CONCEPT,
        segmented_property_type=CLASS_ACTIVATION,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    segment.SegmentDescription = (
        f"AI saliency map (class activation map) of {spec.name} v{served.version}, UNVERIFIED.{warning} "
        "Values are the activation divided by its maximum, not a probability and not a lesion outline."
    )
    return hd.seg.Segmentation(
        source_images=[header],
        pixel_array=fractions,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=spec.name[:_LO_MAX],
        software_versions=f"{manufacturer} {software_version}"[:_LO_MAX],
        device_serial_number=device_uid(served)[:_LO_MAX],
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_label=CONTENT_LABEL,
        content_description=f"AI saliency map, UNVERIFIED{warning}"[:_LO_MAX],
        omit_empty_frames=False,
        contributing_equipment=[model_equipment(served, device_uid(served), manufacturer, software_version)],
        series_description=f"AI saliency (UNVERIFIED){warning} {spec.name} v{served.version}"[:_LO_MAX],
    )


def sr_reference(seg: hd.seg.Segmentation) -> hd.sr.ContentItem:
    """The TID 1500 content item that points from the SR's measurement group to the map.

    A CONTAINS IMAGE item "Referenced Segment" (DCM 121191) naming the Segmentation instance and
    its segment number: the concept TID 1411 (Volumetric ROI Measurements) uses for a
    segmentation, and IHE AI Results with it. The source image is already in the group ("Source",
    SCT 260753009) and in the Segmentation's own references, so it is not repeated here. Neither
    "Source of Measurement" (DCM 121112, the image a measurement was made on) nor "Real World
    Value Map used for measurement" (DCM 126100, a Real World Value Mapping instance) describes a
    map the model produced alongside its decision. The SR must list the Segmentation as evidence
    too (``build_sr(..., extra_evidence=[seg])``).
    """
    return hd.sr.ImageContentItem(
        name=codes.DCM.ReferencedSegment,  # 121191
        referenced_sop_class_uid=str(seg.SOPClassUID),
        referenced_sop_instance_uid=str(seg.SOPInstanceUID),
        referenced_segment_numbers=[SEGMENT_NUMBER],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def overlay_png(source_pixels_0_1: np.ndarray, cam: np.ndarray) -> bytes:
    """The model's input image in grey with the map over it in colour, as PNG bytes.

    ``source_pixels_0_1`` is the preprocessed image the model saw (``[H, W]``, or ``[1, 1, H, W]``
    as the tensor), values in [0, 1], bright = dense; the PNG has its size. The map is resampled
    to it like :func:`resample_map`; opacity grows with the value (up to ``OVERLAY_ALPHA``), so
    regions without activation stay plain grey.
    """
    grey = np.asarray(source_pixels_0_1, dtype=np.float64)
    while grey.ndim > 2 and grey.shape[0] == 1:  # noqa: PLR2004 - squeeze batch and channel axes
        grey = grey[0]
    if grey.ndim != 2 or grey.size == 0:  # noqa: PLR2004
        raise InferenceFailedError(f"the overlay needs one 2-D image, got shape {grey.shape}")
    rows, columns = grey.shape
    buffer = io.BytesIO()
    # Fast deflate: an overlay is shown once, and optimize=True cost ~8x the inference itself.
    Image.fromarray(blend_overlay(grey, resample_map(cam, rows, columns))).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def blend_overlay(grey_0_1: np.ndarray, map_0_1: np.ndarray) -> np.ndarray:
    """A grey image and a map of the same shape, both in [0, 1], blended to RGB uint8 ``[H, W, 3]``.

    The map is coloured along a blue-cyan-yellow-red scale, with opacity growing with its value
    up to ``OVERLAY_ALPHA``, so zero leaves the grey pixel as it was.
    """
    grey = np.clip(np.nan_to_num(np.asarray(grey_0_1, dtype=np.float32)), 0.0, 1.0)
    weight = np.clip(np.nan_to_num(np.asarray(map_0_1, dtype=np.float32)), 0.0, 1.0)
    if grey.shape != weight.shape or grey.ndim != 2:  # noqa: PLR2004
        raise InferenceFailedError(f"image {grey.shape} and map {weight.shape} must be the same 2-D shape")
    alpha = (np.float32(OVERLAY_ALPHA) * weight)[..., None]
    colour = _COLOUR_LUT[np.rint(weight * 255.0).astype(np.uint8)]  # one table look-up per pixel
    rgb = (1.0 - alpha) * (255.0 * grey)[..., None] + alpha * colour
    out: np.ndarray = np.rint(rgb).clip(0, 255).astype(np.uint8)
    return out


def map_fractions(seg: Dataset, source_sop_instance_uid: str) -> np.ndarray:
    """The map a Segmentation made by :func:`saliency_map` holds for one source image, float in [0, 1].

    What a reader (a test, a screenshot, a PACS-side check) gets back through highdicom.
    """
    parsed = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg)
    pixels = parsed.get_pixels_by_source_instance(
        source_sop_instance_uids=[source_sop_instance_uid],
        segment_numbers=[SEGMENT_NUMBER],
        combine_segments=False,
        rescale_fractional=True,
    )
    return np.asarray(pixels[0, :, :, 0], dtype=np.float64)


def _projection_header(source: Dataset) -> Dataset:
    """The source's header as highdicom should see it for a map registered pixel for pixel.

    A projection radiograph has no Image Plane geometry (no Image Position/Orientation), so the
    Segmentation cannot place itself in patient space; it relies on its per-frame reference to
    the source, with the same Rows x Columns, instead (PS3.3 A.51.5.1). Without a usable Frame
    of Reference the Segmentation IOD needs no Pixel Measures, so the header given to highdicom
    drops Frame of Reference UID and Pixel Spacing: a CR's Pixel Spacing is not even part of
    its IOD (RG1's is zero in both axes), and highdicom 0.28 cannot read back a Pixel Measures item
    without a Slice Thickness, which a projection image does not have. Sources with a plane
    geometry keep everything.
    """
    header = source_header(source)
    if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
        for keyword in ("FrameOfReferenceUID", "PixelSpacing", "PositionReferenceIndicator"):
            if keyword in header:
                delattr(header, keyword)
    return header


def _colour_scale(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to RGB (0..255) along the piecewise-linear scale ``_COLOURS``."""
    anchors = np.linspace(0.0, 1.0, len(_COLOURS))
    channels: list[np.ndarray] = [np.interp(values, anchors, _COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1)


#: The colour scale at 256 levels: the overlay looks each pixel up instead of interpolating it.
_COLOUR_LUT: Final = _colour_scale(np.linspace(0.0, 1.0, 256)).astype(np.float32)


__all__: Sequence[str] = (
    "CLASS_ACTIVATION",
    "blend_overlay",
    "map_fractions",
    "overlay_png",
    "resample_map",
    "saliency_map",
    "sr_reference",
)
