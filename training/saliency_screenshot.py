"""Render the served CNN's saliency map over the real RG1 chest CR, from the DICOM objects.

Run from the repository root::

    python -m training.saliency_screenshot [--out docs/images/saliency_rg1.png] [--width 640]

The path is the service's: RG1 (pydicom-data) is preprocessed as ``[preprocessing]`` says, the
served ``cxr-pneumonia`` graph computes ``cam``, ``app.encoders.saliency.saliency_map`` writes
the fractional Segmentation, and the Segmentation is written as Part 10 bytes and read back
with highdicom. Only what came back from those bytes is drawn, over RG1's own pixels (modality
LUT, first VOI window, MONOCHROME1 inverted), so the picture shows what a viewer overlaying the
two DICOM objects would show. RG1 is outside the model's validated input (the service answers
"indeterminate"), and the caption says so: the map of an out-of-distribution image shows where
a phantom-trained network reacted, nothing clinical.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from app.encoders.dicom_sr import sr_bytes
from app.encoders.saliency import blend_overlay, map_fractions, saliency_map
from app.inference.registry import load_version
from app.inference.spec import load_spec
from training.common import REPO_ROOT
from training.dicom_studies import reference_preprocess, voi_to_unit

MODEL_DIR = REPO_ROOT / "models" / "cxr-pneumonia"
DEFAULT_OUT = REPO_ROOT / "docs" / "images" / "saliency_rg1.png"


def render(out: Path, width: int = 640) -> dict[str, float]:
    """Write the screenshot; returns the figures its caption states."""
    spec = load_spec(MODEL_DIR)
    served = load_version(spec, MODEL_DIR, spec.served_versions()[-1])
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    if path is None:
        raise SystemExit("RG1_UNCR.dcm is not installed (the pydicom-data package)")
    ds = pydicom.dcmread(path)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(MODEL_DIR / served.version / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    ood, cam = session.run(["ood_score", "cam"], {"image": reference_preprocess(ds)})
    seg_bytes = sr_bytes(saliency_map(ds, cam[0], served, series_number=991, software_version="screenshot"))
    fractions = map_fractions(pydicom.dcmread(io.BytesIO(seg_bytes)), str(ds.SOPInstanceUID))

    grey = voi_to_unit(ds, np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64))
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":
        grey = 1.0 - grey
    height = round(width * int(ds.Rows) / int(ds.Columns))
    small = np.asarray(Image.fromarray(grey.astype(np.float32)).resize((width, height), Image.Resampling.LANCZOS))
    small_map = np.asarray(
        Image.fromarray(fractions.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    )
    picture = Image.fromarray(blend_overlay(np.clip(small, 0, 1), np.clip(small_map, 0, 1)))

    threshold = spec.ood_of(served.version).threshold  # type: ignore[union-attr]
    score = float(ood[0])
    lines = [
        f"{spec.name} v{served.version}: class activation map for '{spec.positive_label}' over RG1_UNCR.dcm (real CR)",
        f"drawn from the DICOM Segmentation read back with highdicom ({len(seg_bytes) / 1e6:.1f} MB, "
        f"{int(ds.Rows)} x {int(ds.Columns)}, same geometry as the source)",
        f"Service answer: indeterminate - OOD score {score:.1f} = {score / threshold:.2f} x threshold {threshold:g};",
        "outside the validated input, so this map is not evidence of anything.",
        "Synthetic-data demonstration model. NOT FOR CLINICAL USE.",
    ]
    caption_h = 16 * len(lines) + 30
    canvas = Image.new("RGB", (width, height + caption_h), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    bar = np.linspace(0.0, 1.0, width - 20)[None, :].repeat(10, axis=0)
    canvas.paste(Image.fromarray(blend_overlay(np.full_like(bar, 0.5), bar)), (10, height + 6))
    draw.text((10, height + 17), "map 0", fill="black")
    draw.text((width - 40, height + 17), "1", fill="black")
    for i, line in enumerate(lines):
        draw.text((10, height + 30 + 16 * i), line, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    # an adaptive 256-colour palette keeps the file small enough to commit (< 300 kB)
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
        out, format="PNG", optimize=True
    )
    return {"ood_score": score, "threshold": float(threshold or 0.0), "bytes": float(out.stat().st_size)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--width", type=int, default=640)
    args = parser.parse_args(argv)
    print(render(args.out, args.width))


if __name__ == "__main__":
    main()
