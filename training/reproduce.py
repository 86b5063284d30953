"""Reproducibility check: retrain into a scratch folder and compare with the committed metrics.

    python -m training.reproduce                          # both models (about 20 min on 2 cores)
    python -m training.reproduce --model ehr-heart-disease  # seconds
    python -m training.reproduce --model cxr-pneumonia --keep /tmp/repro

Nothing under models/ or training/checkpoints/ is touched. Exit status 0 when every
compared figure is within its tolerance of ``models/<name>/metrics.json``, 1 otherwise.
Whether the ONNX bytes came out identical is printed too, for information: byte identity
is expected on the same machine and library versions, not across CPUs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from training import cxr_pneumonia, ehr_heart_disease
from training.common import MODELS_DIR

# (section, key) -> absolute tolerance
TOLERANCES: dict[str, dict[tuple[str, ...], float]] = {
    "ehr-heart-disease": {
        ("threshold",): 1e-3,
        **{
            (split, key): 0.005
            for split in ("validation", "internal_test", "external_test")
            for key in ("accuracy", "sensitivity", "specificity", "f1", "auroc", "brier")
        },
    },
    "cxr-pneumonia": {
        ("threshold",): 0.1,
        ("flops",): 0.0,
        ("parameters",): 0.0,
        ("test", "auroc"): 0.01,
        **{("test", key): 0.03 for key in ("accuracy", "sensitivity", "specificity", "f1")},
        ("test", "brier"): 0.02,
        ("dicom_roundtrip", "auroc"): 0.03,
        ("validation", "sensitivity"): 0.03,
        # the OOD detector is refitted on the retrained network's features: its threshold moves
        # with them, what it achieves should not
        ("ood", "id_test_flagged"): 0.02,
        ("ood", "groups", "real_radiographs", "flagged_by_score"): 0.0,
        ("ood", "groups", "noise", "auroc"): 0.01,
    },
}


def _get(d: dict[str, Any], path: tuple[str, ...]) -> float:
    cur: Any = d
    for k in path:
        cur = cur[k]
    return float(cur)


def _train(name: str, scratch: Path) -> dict[str, Any]:
    if name == "ehr-heart-disease":
        return ehr_heart_disease.main(["--out", str(scratch / "models")])
    if name == "cxr-pneumonia":
        return cxr_pneumonia.main(["--out", str(scratch / "models"), "--checkpoint-dir", str(scratch / "checkpoints")])
    raise ValueError(name)


def check(name: str, scratch: Path) -> bool:
    committed = json.loads((MODELS_DIR / name / "metrics.json").read_text())
    fresh = _train(name, scratch)
    ok = True
    print(f"\n== {name}: retrained vs committed metrics.json")
    print(f"{'figure':38} {'committed':>11} {'retrained':>11} {'|diff|':>9} {'tol':>7}")
    for path, tol in TOLERANCES[name].items():
        a, b = _get(committed, path), _get(fresh, path)
        diff = abs(a - b)
        good = diff <= tol + 1e-12
        ok &= good
        print(f"{'.'.join(path):38} {a:11.4f} {b:11.4f} {diff:9.4f} {tol:7.3f} {'ok' if good else 'FAIL'}")
    same = committed["sha256"] == fresh["sha256"]
    print(f"ONNX sha256 identical: {same} (informational)")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["all", *TOLERANCES], default="all")
    parser.add_argument("--keep", type=Path, default=None, help="write the retrained artefacts here and keep them")
    args = parser.parse_args(argv)
    names = list(TOLERANCES) if args.model == "all" else [args.model]
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="medinfer-reproduce-"))
    try:
        results = {n: check(n, scratch) for n in names}
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n" + ", ".join(f"{n}: {'REPRODUCED' if r else 'NOT REPRODUCED'}" for n, r in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
