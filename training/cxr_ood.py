"""Out-of-distribution detector of ``cxr-pneumonia``: a Mahalanobis distance on the network's
own penultimate features, computed inside the exported ONNX graph.

The CNN was trained on phantoms only, so every real radiograph, every other anatomy and any
noise image lies outside what it was validated on, yet its softmax still answers with
confidence (RG1 gets "pneumonia 1.000"). The detector asks a different question: does this
image's representation resemble the phantoms'?

Method (Lee et al., NeurIPS 2018, one Gaussian, no input perturbation):

- ``embedding``: the globally average-pooled output of the last residual stage (256 values,
  after ReLU), the input of the linear head.
- Mean and covariance of the embedding over the ``ood_fit`` phantoms (a seed range disjoint
  from train/validation/test and the DICOM round trip). The covariance is Ledoit-Wolf shrunk
  (``sklearn.covariance.LedoitWolf``), since many of the 256 ReLU features are nearly
  collinear or nearly constant.
- ``ood_score`` = sqrt((e - mean)^T precision (e - mean)), the distance (not squared), one
  float per image, shape ``[-1]``. The graph holds the mean and the precision's Cholesky factor
  ``W`` (precision = W W^T) as constants, so the score is ``||(e - mean) W||`` and the
  version's SHA-256 pins the statistics.
- Threshold: the 99th percentile of the score on the ``ood_cal`` phantoms (another disjoint
  seed range), rounded up to 3 decimals. The share of the untouched test split above it is
  measured, not chosen.

Content checks (``min_std``, ``saturation_fraction``) guard the cases where a distance in
feature space says little: the network standardises each image first, so a blank or
constant image reaches the convolutions as zeros.

numpy, scikit-learn, pydicom and torch only; the orchestration (data, export, artefacts)
lives in ``training.cxr_pneumonia``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from torch import nn

from training.dicom_studies import reference_preprocess

METHOD = "mahalanobis-penultimate"
OUTPUT = "ood_score"
EMBEDDING = "embedding"
QUANTILE = 0.99
#: Pixel values within this of 0 or 1 count as saturated (the service uses the same epsilon).
SATURATION_EPS = 1e-6
SIZE = 224

REAL_RADIOGRAPHS = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
OTHER_ANATOMY = (
    "RG3_UNCR.dcm",
    "RG3_UNCI.dcm",
    "RG3_J2KR.dcm",
    "RG3_J2KI.dcm",
    "MR2_UNCR.dcm",
    "MR2_UNCI.dcm",
    "MR2_J2KR.dcm",
    "MR2_J2KI.dcm",
    "693_UNCR.dcm",
    "693_UNCI.dcm",
    "693_J2KR.dcm",
    "US1_UNCR.dcm",
    "US1_UNCI.dcm",
    "US1_J2KR.dcm",
    "US1_J2KI.dcm",
)


# ----------------------------------------------------------------------------- graph


class OodExport(nn.Module):
    """The classifier with two more outputs: its embedding and the Mahalanobis distance.

    ``net`` must offer ``features(image) -> [N, D]`` and ``fc`` (the linear head); the
    probabilities are ``softmax(fc(features))``, the same arithmetic as version 1's graph.
    """

    def __init__(self, net: nn.Module, mean: np.ndarray, whiten: np.ndarray) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("ood_mean", torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("ood_whiten", torch.from_numpy(np.asarray(whiten, dtype=np.float32)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self.net.features(image)  # type: ignore[operator]
        probabilities = torch.softmax(self.net.fc(embedding), dim=1)  # type: ignore[operator]
        z = (embedding - self.ood_mean) @ self.ood_whiten
        score = torch.sqrt((z * z).sum(dim=1))
        return probabilities, embedding, score


def embeddings(net: nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Penultimate features of a float [N, 1, H, W] batch, float64 [N, D] (torch, eval mode)."""
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.asarray(x[i : i + batch], dtype=np.float32))
            out.append(net.features(xb).numpy())  # type: ignore[operator]
    return np.concatenate(out).astype(np.float64)


@dataclass(frozen=True)
class Gaussian:
    mean: np.ndarray  # [D] float32
    whiten: np.ndarray  # [D, D] float32, precision = whiten @ whiten.T
    shrinkage: float
    n: int

    def distance(self, emb: np.ndarray) -> np.ndarray:
        """The score the graph computes, in float64 (for checks)."""
        z = (np.asarray(emb, np.float64) - self.mean.astype(np.float64)) @ self.whiten.astype(np.float64)
        return np.sqrt(np.sum(z * z, axis=1))


def fit_gaussian(emb: np.ndarray) -> Gaussian:
    """Mean and Ledoit-Wolf covariance of the in-distribution embeddings, as graph constants."""
    lw = LedoitWolf(store_precision=True, assume_centered=False).fit(np.asarray(emb, np.float64))
    precision = (lw.precision_ + lw.precision_.T) / 2.0
    whiten = np.linalg.cholesky(precision)  # lower-triangular L with precision = L L^T
    return Gaussian(
        mean=lw.location_.astype(np.float32),
        whiten=whiten.astype(np.float32),
        shrinkage=float(lw.shrinkage_),
        n=len(emb),
    )


def threshold_at_quantile(scores: np.ndarray, q: float = QUANTILE) -> float:
    """The q-quantile of the calibration scores, rounded up to 3 decimals (never below it)."""
    return math.ceil(float(np.quantile(np.asarray(scores, np.float64), q)) * 1000.0) / 1000.0


# ----------------------------------------------------------------------------- content checks


def content_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image of a [N, 1, H, W] batch in [0, 1]: the standard deviation and the share of
    pixels at either end of the range (<= 0 + eps or >= 1 - eps), both float64 [N]."""
    std, sat = np.empty(len(x)), np.empty(len(x))
    for i in range(0, len(x), 128):  # chunks: a float64 copy of 2000 images would take 800 MB
        flat = np.asarray(x[i : i + 128], np.float64).reshape(-1, x[0].size)
        std[i : i + 128] = flat.std(axis=1)
        sat[i : i + 128] = ((flat <= SATURATION_EPS) | (flat >= 1.0 - SATURATION_EPS)).mean(axis=1)
    return std, sat


def content_flags(x: np.ndarray, min_std: float, saturation_fraction: float) -> np.ndarray:
    """Which images the content checks stop (blank/constant or saturated), bool [N]."""
    std, sat = content_stats(x)
    return (std < min_std) | (sat >= saturation_fraction)


# ----------------------------------------------------------------------------- OOD inputs


def _testdata(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (the pydicom-data package, offline)")
    return pydicom.dcmread(path)


def monochrome(ds: Dataset) -> Dataset:
    """An RGB/YBR instance as a MONOCHROME2 one (ITU-R BT.601 luma), other attributes kept.

    pydicom already converts YBR to RGB when it decodes, so ``pixel_array`` is RGB here.
    """
    if ds.get("SamplesPerPixel", 1) == 1:
        return ds
    rgb = np.asarray(ds.pixel_array, np.float64)
    luma = np.rint(rgb @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)
    out = copy.deepcopy(ds)
    if "PlanarConfiguration" in out:
        del out.PlanarConfiguration
    out.set_pixel_data(luma, "MONOCHROME2", 8, generate_instance_uid=False)
    return out


def preprocess_file(name: str) -> np.ndarray:
    """A pydicom-data file through ``reference_preprocess`` (the model's [preprocessing])."""
    return reference_preprocess(monochrome(_testdata(name)), SIZE)


def dicom_group(names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    return list(names), np.concatenate([preprocess_file(n) for n in names])


def synthetic_ood(seed: int, n: int = 20) -> dict[str, tuple[list[str], np.ndarray]]:
    """Noise and blank/constant images in the model's input range, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    shape = (n, 1, SIZE, SIZE)
    uniform = rng.random(shape)
    gaussian = np.clip(rng.normal(0.5, 0.15, shape), 0.0, 1.0)
    # smooth random fields: the kind of low-frequency "anatomy" noise has none of
    k = np.fft.fftfreq(SIZE)
    lowpass = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * 0.02**2))
    fields = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * lowpass))
    lo = fields.min(axis=(2, 3), keepdims=True)
    hi = fields.max(axis=(2, 3), keepdims=True)
    smooth = (fields - lo) / (hi - lo)
    constants = [0.0, 0.25, 0.5, 0.75, 1.0]
    flat = np.stack([np.full((1, SIZE, SIZE), c) for c in constants])
    # saturated: a phantom-like two-level image (half black, half white) and a hard-clipped
    # gradient: mostly 0 or 1 with a thin ramp between
    ramp = np.clip((np.linspace(-4.0, 5.0, SIZE)[None, :] * np.ones((SIZE, 1))), 0.0, 1.0)
    binary = (rng.random((SIZE, SIZE)) > 0.5).astype(np.float64)
    saturated = np.stack([ramp[None], ramp.T[None], binary[None]])
    return {
        "noise": (
            [f"{kind}-{i}" for kind in ("uniform", "gaussian", "smooth") for i in range(n)],
            np.concatenate([uniform, gaussian, smooth]).astype(np.float32),
        ),
        "blank_constant": ([f"constant-{c}" for c in constants], flat.astype(np.float32)),
        "saturated": (["clipped-ramp-h", "clipped-ramp-v", "binary-noise"], saturated.astype(np.float32)),
    }


def ood_groups(seed: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Every group the card reports, name -> (per-image names, [N, 1, 224, 224] inputs)."""
    return {
        "real_radiographs": dicom_group(REAL_RADIOGRAPHS),
        "other_anatomy": dicom_group(OTHER_ANATOMY),
        **synthetic_ood(seed),
    }


# ----------------------------------------------------------------------------- evaluation


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """AUROC of the score at telling OOD (positive) from in-distribution images."""
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return float(roc_auc_score(y, np.r_[id_scores, ood_scores]))


def evaluate_groups(
    score_fn: Callable[[np.ndarray], np.ndarray],
    id_scores: np.ndarray,
    groups: dict[str, tuple[list[str], np.ndarray]],
    threshold: float,
    checks: tuple[float, float],
) -> dict[str, Any]:
    """Per group: n, AUROC against the ID test scores, share above the threshold, share stopped
    by the content checks, share caught by either, and per-file score and score/threshold."""
    out: dict[str, Any] = {}
    for name, (names, x) in groups.items():
        s = np.asarray(score_fn(x), np.float64)
        caught_content = content_flags(x, *checks)
        std, sat = content_stats(x)
        out[name] = {
            "n": len(names),
            "auroc": round(auroc(id_scores, s), 4),
            "flagged_by_score": round(float(np.mean(s > threshold)), 4),
            "flagged_by_content_checks": round(float(np.mean(caught_content)), 4),
            "flagged_either": round(float(np.mean((s > threshold) | caught_content)), 4),
            "score_min": round(float(s.min()), 3),
            "score_median": round(float(np.median(s)), 3),
            "per_file": [
                {
                    "name": n,
                    "score": round(float(v), 3),
                    "ratio": round(float(v) / threshold, 3),
                    "std": round(float(sd), 4),
                    "saturated": round(float(sf), 4),
                }
                for n, v, sd, sf in zip(names, s, std, sat, strict=True)
            ],
        }
    return out


def render_card_section(m: dict[str, Any]) -> str:
    """The model card's "Out-of-distribution detection" section from ``metrics["ood"]``."""
    o = m["ood"]
    cc = o["content_checks"]
    g = o["groups"]
    labels = {
        "real_radiographs": "Real chest radiographs (RG1, 4 encodings)",
        "other_anatomy": "Other anatomy (RG3 extremity CR, MR2 MR, 693 CT, US1 ultrasound as grey)",
        "noise": "Noise (uniform, Gaussian, smooth random fields)",
        "blank_constant": "Blank and constant images",
        "saturated": "Saturated images (clipped ramps, binary noise)",
    }
    rows = "\n".join(
        f"| {labels.get(k, k)} | {v['n']} | {v['auroc']:.3f} | {100 * v['flagged_by_score']:.0f} % | "
        f"{100 * v['flagged_by_content_checks']:.0f} % | {100 * v['flagged_either']:.0f} % |"
        for k, v in g.items()
    )
    rg1 = "\n".join(
        f"| `{f['name']}` | {f['score']:.2f} | {f['ratio']:.2f} |" for f in g["real_radiographs"]["per_file"]
    )
    other = "\n".join(
        f"| `{f['name']}` | {f['score']:.2f} | {f['ratio']:.2f} |" for f in g["other_anatomy"]["per_file"]
    )
    dv = "\n".join(
        f"| {v['variant']} | {v['n']} | {v['score_max']:.2f} | {v['ratio_max']:.2f} | {v['flagged']} |"
        for v in o["dicom_roundtrip_by_variant"]
    )
    fit, cal = o["fit"], o["calibration_split"]
    return f"""## Out-of-distribution detection

The network was trained on phantoms only. **A real radiograph is outside its validated input**,
and so is any other anatomy, noise or a blank image: for these the service gives no label and
answers "indeterminate: outside the model's validated input" with the score. `[versions.2.ood]`
in `model.toml` declares the detector; the statistics live inside `2/model.onnx`, so its
SHA-256 pins them.

| | |
|---|---|
| Method | `{o["method"]}`: Mahalanobis distance of the penultimate features (global average pool of the last stage, {o["embedding_dim"]} values) to the in-distribution mean, with a Ledoit-Wolf shrunk covariance (shrinkage {fit["shrinkage"]:.4f}); computed inside the graph from constants (mean and the precision's Cholesky factor) |
| Outputs | `probabilities` `[-1, 2]` (unchanged), `embedding` `[-1, {o["embedding_dim"]}]`, `ood_score` `[-1]` = the distance (not squared), one per image; higher = further from the phantoms |
| Statistics fitted on | `ood_fit` phantoms, seeds {fit["first_seed"]}+ (n = {fit["n"]}, 50 % positive), disjoint from train/validation/test |
| Threshold | **{o["threshold"]:.3f}**: the {100 * o["quantile"]:.0f}th percentile of the score on `ood_cal` phantoms (seeds {cal["first_seed"]}+, n = {cal["n"]}), rounded up; a score above it is outside |
| In-distribution test phantoms flagged | **{100 * o["id_test_flagged"]:.2f} %** ({o["id_test_flagged_n"]} of {o["id_test_n"]}; target <= 5 %); by the content checks: {o["id_test_content_flagged_n"]} |
| DICOM round-trip phantoms flagged | {100 * o["dicom_roundtrip_flagged"]:.2f} % ({o["dicom_roundtrip_flagged_n"]} of {o["dicom_roundtrip_n"]}) |
| Content checks | `min_std = {cc["min_std"]}` (below: blank/constant), `saturation_fraction = {cc["saturation_fraction"]}` (at or above this share of pixels at 0 or 1: saturated) |

AUROC of the score at separating the {o["id_test_n"]} in-distribution test phantoms from each group, and
the share of each group that gets "indeterminate" (score above the threshold, content checks, either):

| OOD group | n | AUROC | score > threshold | content checks | either |
|---|---|---|---|---|---|
{rows}

With only four real radiographs (one image in four encodings) the AUROC says little; the
per-file scores say more. Score / threshold above 1 means indeterminate:

| Real radiograph | score | score / threshold |
|---|---|---|
{rg1}

| Other anatomy | score | score / threshold |
|---|---|---|
{other}

In-distribution test phantoms: score median {o["id_test_score_median"]:.2f}, 99th percentile
{o["id_test_score_p99"]:.2f}, max {o["id_test_score_max"]:.2f}. Content statistics of the test, `ood_cal`
and DICOM round-trip phantoms: std >= {cc["id_min_std"]:.4f}, saturated share <= {cc["id_max_saturated"]:.4f};
the limits keep a margin (a tenth of that std; twice that share, rounded up to 0.05, at least 0.25),
and no in-distribution image trips a content check.

DICOM round trip (phantoms written at 512 x 512 with each encoding, read back through
`reference_preprocess`), per variant:

| Variant | n | max score | max score / threshold | flagged |
|---|---|---|---|---|
{dv}

Limits: the statistics describe phantoms, so the detector separates "phantom-like" from
"not phantom-like". It does not say that an in-distribution phantom is classified
correctly, and a phantom-like image that is not a chest film could pass it. The content
checks run on the preprocessed tensor, after windowing.
"""  # noqa: E501
