"""DICOM preprocessing cost: medinfer's ``to_tensor`` (decode and the whole pixel recipe) against
pydicom's bare ``ds.pixel_array``, on the same files, in one run.

Run from the repository root::

    .venv/bin/python bench/dicom_decode.py                 # RG1_UNCR and RG1_J2KR, 9 repetitions
    .venv/bin/python bench/dicom_decode.py --repeat 21 --file RG1_J2KI.dcm

For each file (from pydicom-data, never downloaded) it times, on a freshly parsed dataset each
repetition so that no decoded array is cached: ``ds.pixel_array`` (bare decode), medinfer's
``decode``, and ``to_tensor`` with the ``cxr-pneumonia`` recipe; ``read_instance`` is shown for
context. Medians are printed with the ratio to_tensor / bare decode (target <= 1.3x) and the
largest difference from ``training.dicom_studies.reference_preprocess``, the training reference.
It prints figures only; it never fails on timing.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from app.parsing.dicom import DicomLimits, read_instance
from app.preprocess.pixels import PixelRecipe, decode, to_tensor

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_TOML = REPO_ROOT / "models" / "cxr-pneumonia" / "model.toml"
TARGET_RATIO = 1.3
LIMITS = DicomLimits(max_bytes=256 << 20, max_pixel_bytes=1 << 30, max_frames=1024)


def recipe() -> PixelRecipe:
    spec = tomllib.loads(MODEL_TOML.read_text())
    return PixelRecipe.from_preprocessing(spec["preprocessing"], spec["inputs"][0]["shape"])


def _median_ms(data: bytes, step: Callable[[pydicom.Dataset], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        ds = pydicom.dcmread(io.BytesIO(data))
        start = time.perf_counter()
        step(ds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _reference_difference(data: bytes, pixel_recipe: PixelRecipe) -> float | None:
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from training.dicom_studies import reference_preprocess  # noqa: PLC0415 - training code is optional here
    except ImportError:
        return None
    ours = to_tensor(pydicom.dcmread(io.BytesIO(data)), pixel_recipe)
    theirs = reference_preprocess(pydicom.dcmread(io.BytesIO(data)), pixel_recipe.size[0])[0]
    return float(np.abs(ours - theirs).max())


def measure(name: str, repeat: int, pixel_recipe: PixelRecipe) -> dict[str, object]:
    path = get_testdata_file(name, download=False)
    if path is None:
        raise SystemExit(f"{name} is not in the installed pydicom-data")
    data = Path(path).read_bytes()
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    # Warm-up: imports, plugin discovery and first-touch page faults stay out of the medians.
    _median_ms(data, lambda ds: ds.pixel_array, 1)
    _median_ms(data, lambda ds: to_tensor(ds, pixel_recipe), 1)
    bare = _median_ms(data, lambda ds: ds.pixel_array, repeat)
    ours_decode = _median_ms(data, decode, repeat)
    total = _median_ms(data, lambda ds: to_tensor(ds, pixel_recipe), repeat)
    read_times = []
    for _ in range(repeat):
        start = time.perf_counter()
        read_instance(data, LIMITS)
        read_times.append(time.perf_counter() - start)
    return {
        "file": name,
        "syntax": header.file_meta.TransferSyntaxUID.name,
        "shape": f"{header.Rows}x{header.Columns}x{header.BitsStored}b",
        "read_instance_ms": statistics.median(read_times) * 1e3,
        "bare_ms": bare,
        "decode_ms": ours_decode,
        "to_tensor_ms": total,
        "ratio": total / bare,
        "max_abs_diff": _reference_difference(data, pixel_recipe),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=9, help="repetitions per measurement (median)")
    parser.add_argument(
        "--file", action="append", dest="files", help="pydicom-data file name (repeatable); default RG1_UNCR, RG1_J2KR"
    )
    args = parser.parse_args(argv)
    files = args.files or ["RG1_UNCR.dcm", "RG1_J2KR.dcm"]
    pixel_recipe = recipe()
    rows = [measure(name, args.repeat, pixel_recipe) for name in files]

    header = (
        f"{'file':<16} {'transfer syntax':<44} {'image':<14} {'read_inst':>9} {'bare':>9} {'decode':>9} "
        f"{'to_tensor':>9} {'ratio':>6}  target  max|diff|"
    )
    print(f"median of {args.repeat} runs, milliseconds; ratio = to_tensor / bare ds.pixel_array")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = float(r["ratio"])  # type: ignore[arg-type]
        diff = r["max_abs_diff"]
        print(
            f"{r['file']:<16} {r['syntax']!s:<44} {r['shape']!s:<14} {r['read_instance_ms']:>9.2f} "
            f"{r['bare_ms']:>9.2f} {r['decode_ms']:>9.2f} {r['to_tensor_ms']:>9.2f} {ratio:>5.2f}x  "
            f"{'PASS' if ratio <= TARGET_RATIO else 'MISS':<6}  {'n/a' if diff is None else f'{diff:.1e}'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
