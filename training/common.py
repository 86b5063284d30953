"""Helpers shared by the training scripts: hashing, metrics with bootstrap CIs, plots, TOML.

matplotlib is imported inside ``save_plots`` only, so the parity tests (which import the
training scripts) do not need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import math
import os
import platform
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "models"


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- metrics


def binary_metrics(y_true: np.ndarray, p_pos: np.ndarray, threshold: float) -> dict[str, float]:
    """Threshold-dependent and threshold-free metrics for one binary problem."""

    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    auroc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return {
        "accuracy": (tp + tn) / len(y),
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "f1": f1,
        "auroc": auroc,
        "brier": float(brier_score_loss(y, p)),
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


CI_KEYS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auroc", "brier")


def bootstrap_ci(
    y_true: np.ndarray,
    p_pos: np.ndarray,
    threshold: float,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, list[float]]:
    """Percentile bootstrap CIs (resampling patients with replacement)."""

    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(y)
    samples: dict[str, list[float]] = {k: [] for k in CI_KEYS}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        yb, pb = y[idx], p[idx]
        pred = pb >= threshold
        tp = np.sum(pred & (yb == 1))
        tn = np.sum(~pred & (yb == 0))
        fp = np.sum(pred & (yb == 0))
        fn = np.sum(~pred & (yb == 1))
        samples["accuracy"].append((tp + tn) / n)
        samples["brier"].append(float(np.mean((pb - yb) ** 2)))
        if tp + fn:
            samples["sensitivity"].append(tp / (tp + fn))
        if tn + fp:
            samples["specificity"].append(tn / (tn + fp))
        if tp + fp:
            samples["precision"].append(tp / (tp + fp))
        if tp + fp + fn:
            samples["f1"].append(2 * tp / (2 * tp + fp + fn))
        if 0 < yb.sum() < n:
            samples["auroc"].append(float(roc_auc_score(yb, pb)))
    out: dict[str, list[float]] = {}
    for k, vals in samples.items():
        arr = np.asarray(vals, dtype=np.float64)
        if arr.size == 0:
            out[k] = [float("nan"), float("nan")]
        else:
            lo, hi = np.quantile(arr, [alpha / 2, 1 - alpha / 2])
            out[k] = [float(lo), float(hi)]
    return out


def evaluate_split(
    y_true: np.ndarray, p_pos: np.ndarray, threshold: float, *, seed: int, n_boot: int = 2000
) -> dict[str, Any]:
    point = binary_metrics(y_true, p_pos, threshold)
    ci = bootstrap_ci(y_true, p_pos, threshold, n_boot=n_boot, seed=seed)
    y = np.asarray(y_true).astype(int)
    return {
        "n": len(y),
        "n_positive": int(y.sum()),
        "prevalence": float(y.mean()),
        "mean_predicted": _round(float(np.mean(p_pos))),
        "threshold": float(threshold),
        **{k: _round(v) for k, v in point.items()},
        "ci95": {k: [_round(v[0]), _round(v[1])] for k, v in ci.items()},
    }


def _round(v: float | int, nd: int = 6) -> float | int:
    if isinstance(v, int):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return float("nan")
    return round(float(v), nd)


def threshold_for_sensitivity(y_true: np.ndarray, p_pos: np.ndarray, target: float) -> float:
    """Largest threshold (rounded down to 4 decimals) whose sensitivity is >= target."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    best = 0.0
    for t in np.unique(np.floor(p * 1e4) / 1e4)[::-1]:
        pred = p >= t
        sens = np.sum(pred & (y == 1)) / max(1, np.sum(y == 1))
        if sens >= target:
            best = float(t)
            break
    return best


def threshold_youden(y_true: np.ndarray, p_pos: np.ndarray) -> float:

    fpr, tpr, thr = roc_curve(np.asarray(y_true).astype(int), p_pos)
    j = tpr - fpr
    i = int(np.argmax(j[1:])) + 1  # skip the +inf threshold
    return float(np.floor(float(thr[i]) * 1e4) / 1e4)


# --------------------------------------------------------------------------- plots


def save_plots(
    out_dir: Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    threshold: float,
    labels: Sequence[str],
    title: str,
    *,
    n_bins: int = 10,
) -> list[str]:
    """Write roc_curve.png, calibration_curve.png and confusion_matrix.png into out_dir."""
    import matplotlib  # noqa: PLC0415 - optional at import time (not needed by the tests)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    meta = {"Software": None}
    files = []

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (y, p) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, p):.3f}, n={len(y)})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(f"{title}: ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roc_curve.png", dpi=110, metadata=meta)
    plt.close(fig)
    files.append("roc_curve.png")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (y, p) in curves.items():
        frac, mean_p = calibration_curve(y, p, n_bins=n_bins, strategy="quantile")
        ax.plot(mean_p, frac, marker="o", label=name)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect calibration")
    ax.set_xlabel(f"mean predicted P({labels[1]}) (quantile bins)")
    ax.set_ylabel(f"observed fraction {labels[1]}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: calibration")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "calibration_curve.png", dpi=110, metadata=meta)
    plt.close(fig)
    files.append("calibration_curve.png")

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4))
    axes = np.atleast_1d(axes)
    for ax, (name, (y, p)) in zip(axes, curves.items(), strict=True):
        cm = confusion_matrix(y, (np.asarray(p) >= threshold).astype(int), labels=[0, 1])
        ax.imshow(cm, cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black",
                    fontsize=14,
                )
        ax.set_xticks([0, 1], [f"pred {labels[0]}", f"pred {labels[1]}"])
        ax.set_yticks([0, 1], [f"true {labels[0]}", f"true {labels[1]}"])
        ax.set_title(f"{name}\nthreshold {threshold:.4f}", fontsize=9)
    fig.suptitle(f"{title}: confusion matrix")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion_matrix.png", dpi=110, metadata=meta)
    plt.close(fig)
    files.append("confusion_matrix.png")
    return files


# --------------------------------------------------------------------------- TOML


def toml_value(v: Any) -> str:
    """Render a Python value as TOML (strings, numbers, bools, lists, inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise ValueError("NaN/inf are not written to model.toml")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, Sequence):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {type(v).__name__} as TOML")


def toml_key(k: str) -> str:
    if k and all(c.isalnum() or c in "-_" for c in k):
        return k
    return json.dumps(k, ensure_ascii=False)


def toml_table(header: str | None, items: Mapping[str, Any], array: bool = False) -> str:
    lines = []
    if header is not None:
        lines.append(f"[[{header}]]" if array else f"[{header}]")
    for k, v in items.items():
        lines.append(f"{toml_key(k)} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def write_checked_toml(path: Path, text: str) -> dict[str, Any]:
    """Write text and verify it parses; returns the parsed document."""
    parsed = tomllib.loads(text)
    path.write_text(text, encoding="utf-8")
    return parsed


def environment_info() -> dict[str, str]:

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("numpy", "scikit-learn", "skl2onnx", "onnx", "onnxruntime-gpu", "torch", "pandas"):
        with contextlib.suppress(md.PackageNotFoundError):
            info[pkg] = md.version(pkg)
    return info


def dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n", encoding="utf-8")


def run_onnx(path: Path | str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run an ONNX model on the CPU provider (deterministic, no CUDA needed)."""

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))
