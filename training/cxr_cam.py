"""Class activation map (CAM) of ``cxr-pneumonia``, computed inside the exported ONNX graph.

Zhou et al. (CVPR 2016): for a network whose head is global average pooling followed by one
linear layer, the head's weights say how much each channel of the last stage counts for a
class, so weighting that stage's feature maps with them shows *where* the evidence lies.

Which weights: the difference ``w_pneumonia - w_normal`` of the head's two rows. With a
two-class softmax, P(pneumonia) = sigmoid(z_pneumonia - z_normal), so only that difference
moves the decision; a channel that raises both logits alike is not evidence for either. The
unrectified map ``M = sum_c (w_p - w_n)[c] * F[c]`` then has an exact reading: its spatial
mean plus ``b_p - b_n`` is the positive label's log-odds. The exported ``cam`` is ``ReLU(M)``
(classic CAM keeps only the evidence *for* the label), FP32 ``[N, 7, 7]`` for a 224 x 224
input: the last stage's own resolution (stride 32). It is not upsampled in the graph: the
encoder resamples it once, straight to the source image's Rows x Columns, instead of twice
(7 -> 224 -> source), and 49 floats per image cost the batcher nothing. Cell ``(i, j)`` is
centred on input pixel ``((i + 0.5) * 32, (j + 0.5) * 32)``, so half-pixel-centre bilinear
resampling (Pillow's BILINEAR, ``torch`` ``align_corners=False``) lines it up with the image.

The other outputs (``probabilities``, ``embedding``, ``ood_score``) are the same arithmetic
as ``cxr_ood.OodExport``; ``training.cxr_pneumonia.reexport`` checks their values against
the graph this one replaces.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as tnf

OUTPUT = "cam"
METHOD = "cam"
#: The last stage's stride: a 224 x 224 input gives 7 x 7 maps.
STRIDE = 32


class CamOodExport(nn.Module):
    """The classifier with its embedding, the Mahalanobis OOD distance and the CAM.

    ``net`` must offer ``feature_maps(image) -> [N, C, h, w]`` (the last stage, after ReLU)
    and ``fc`` (the linear head, rows in label order); ``positive`` is the positive label's
    row, the other row of a two-class head is the reference.
    """

    def __init__(self, net: nn.Module, mean: np.ndarray, whiten: np.ndarray, positive: int = 1) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("ood_mean", torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("ood_whiten", torch.from_numpy(np.asarray(whiten, dtype=np.float32)))
        self.register_buffer("cam_weight", cam_weights(net, positive))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.net.feature_maps(image)  # type: ignore[operator]
        embedding = fmap.mean(dim=(2, 3))
        probabilities = torch.softmax(self.net.fc(embedding), dim=1)  # type: ignore[operator]
        z = (embedding - self.ood_mean) @ self.ood_whiten
        score = torch.sqrt((z * z).sum(dim=1))
        cam = torch.relu(torch.einsum("nchw,c->nhw", fmap, self.cam_weight))
        return probabilities, embedding, score, cam


def cam_weights(net: nn.Module, positive: int = 1) -> torch.Tensor:
    """``w_positive - w_other`` of a two-class linear head, float32 [C] (detached copy)."""
    weight = net.fc.weight.detach()  # type: ignore[union-attr]
    if weight.shape[0] != 2:  # the log-odds reading needs a two-class head
        raise ValueError("CAM weights as a log-odds difference need a two-class head")
    return (weight[positive] - weight[1 - positive]).clone().float()


def raw_maps(net: nn.Module, x: np.ndarray, positive: int = 1) -> tuple[np.ndarray, float]:
    """The unrectified maps ``M`` of a [N, 1, H, W] batch (torch, float64 [N, h, w]) and the
    head's bias difference ``b_positive - b_other``: ``M.mean((1, 2)) + bias`` is the log-odds."""
    net.eval()
    w = cam_weights(net, positive)
    bias = net.fc.bias.detach()  # type: ignore[union-attr]
    with torch.no_grad():
        fmap = net.feature_maps(torch.from_numpy(np.asarray(x, np.float32)))  # type: ignore[operator]
        maps = torch.einsum("nchw,c->nhw", fmap, w)
    return maps.numpy().astype(np.float64), float(bias[positive] - bias[1 - positive])


def upsample(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Half-pixel-centre bilinear resampling of [N, h, w] maps to [N, rows, columns], float64.

    The same sampling as Pillow's BILINEAR when enlarging (what the service's encoder uses).
    """
    t = torch.from_numpy(np.asarray(cam, np.float64))[:, None]
    out = tnf.interpolate(t, size=(rows, columns), mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


#: The pointing game's tolerance (Zhang et al., ECCV 2016): a peak within 15 pixels of the
#: object, in the model's 224 x 224 input, counts as a hit.
TOLERANCE_PX = 15.0


def pointing_game(cams: np.ndarray, masks: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Where the map's peak (after upsampling to the mask size, the model's input) falls.

    ``masks`` [N, H, W] in [0, 1]; a pixel is lesion where the mask is at least ``threshold``.
    ``peak_in_lesion``: the peak pixel is lesion. ``peak_within_tolerance``: the pointing game
    proper, the peak within ``TOLERANCE_PX`` of a lesion pixel. Each comes with its chance level,
    the share of the image where a random point would score.
    """
    from scipy import ndimage  # noqa: PLC0415 - only the card's figures need it

    rows, columns = masks.shape[1:]
    up = upsample(cams, rows, columns)
    strict, near, area, near_area, flat = [], [], [], [], 0
    for m, mask in zip(up, masks, strict=True):
        lesion = mask >= threshold
        distance = ndimage.distance_transform_edt(~lesion)
        if float(m.max()) <= 0.0:
            flat += 1
            strict.append(False)
            near.append(False)
        else:
            r, c = np.unravel_index(int(np.argmax(m)), m.shape)
            strict.append(bool(lesion[r, c]))
            near.append(bool(distance[r, c] <= TOLERANCE_PX))
        area.append(float(np.mean(lesion)))
        near_area.append(float(np.mean(distance <= TOLERANCE_PX)))
    return {
        "n": len(strict),
        "peak_in_lesion": round(float(np.mean(strict)), 4),
        "chance": round(float(np.mean(area)), 4),
        "tolerance_px": TOLERANCE_PX,
        "peak_within_tolerance": round(float(np.mean(near)), 4),
        "chance_within_tolerance": round(float(np.mean(near_area)), 4),
        "all_zero_maps": flat,
    }


def render_card_section(cam: dict[str, Any]) -> str:
    """The model card's "Explanations" section from ``metrics["cam"]``."""
    pg = cam["pointing_game"]
    return f"""## Explanations

`[explain]` in `model.toml` says `method = "cam"`, `output = "cam"`: the graph computes a class
activation map (Zhou et al., CVPR 2016) beside the probabilities, so an explanation costs no
second inference.

| | |
|---|---|
| Output | `cam`, FP32 `[-1, {cam["shape"][1]}, {cam["shape"][2]}]`: the last stage's feature maps (stride {STRIDE}, so {cam["shape"][1]} x {cam["shape"][2]} for a 224 x 224 input), weighted by `w_pneumonia - w_normal` of the linear head, ReLU'd |
| Why the weight difference | With a two-class softmax only `z_pneumonia - z_normal` moves P(pneumonia); the unrectified map's spatial mean plus `b_pneumonia - b_normal` equals the log-odds of pneumonia (checked to {cam["log_odds_max_abs_diff"]:.1e} on test phantoms) |
| Resolution | Not upsampled in the graph: cell (i, j) is centred on input pixel ((i + 0.5) x {STRIDE}, (j + 0.5) x {STRIDE}); the service resamples it once (half-pixel-centre bilinear) to the source image's Rows x Columns, normalises it to [0, 1] and sends it as a fractional DICOM Segmentation (Segmented Property Type DCM 130402 "Class activation") referenced from the SR, or a PNG overlay |
| Pointing game (test phantoms) | over {pg["n"]} positive test phantoms, the map's peak lies within {pg["tolerance_px"]:.0f} px (of 224) of the consolidation (mask >= 0.5) in **{100 * pg["peak_within_tolerance"]:.1f} %** (chance, the share of the image that close to the lesion: {100 * pg["chance_within_tolerance"]:.1f} %), and inside it in {100 * pg["peak_in_lesion"]:.1f} % (chance, the lesion's share of the image: {100 * pg["chance"]:.1f} %); {pg["all_zero_maps"]} map(s) all zero. The tolerance is the pointing game's (Zhang et al., ECCV 2016); a 7 x 7 map peaks at a cell centre, 32 px apart, and the average lesion covers about 2 % of the image |

Limits: a CAM shows where the last stage found evidence, at 32-pixel resolution, not the
lesion's outline; it is as synthetic as the model (the phantoms' consolidations, not real
pneumonia). On an image outside the validated input (an "indeterminate" answer) the map
means nothing either. Not for clinical use.
"""  # noqa: E501


def lesion_masks(seeds: list[int], size: int = 224) -> np.ndarray:
    """The consolidation masks of positive phantoms, float32 [N, size, size] (pool worker)."""
    from training import phantoms  # noqa: PLC0415 - keeps this module importable without the generator's cost

    return np.stack([phantoms.generate_with_mask(int(s), True, size).lesion_mask for s in seeds])
