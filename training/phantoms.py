"""Procedural chest-radiograph phantoms (PA view), deterministic from a seed. numpy only.

No real chest X-ray data set can be fetched offline, so medinfer's imaging reference model
(`cxr-pneumonia`) is trained on these phantoms, and the DICOM writer in
``training.dicom_studies`` turns them into test studies. They look like a chest radiograph
to a CNN, not to a radiologist.

What a phantom holds, all in a normalised patient frame (x, y in [-1, 1], x to the image
right = patient's left in a PA view, y downwards) under a random rotation, scale and shift:

- body soft tissue with a thickness profile, shoulders, optional breast shadows;
- two lung fields (superellipses cut by the hemidiaphragm domes and the mediastinum),
  air-filled (low attenuation), with branching vascular markings from the hila;
- mediastinum, heart shadow (varied size and position), aortic knob, trachea, spine;
- posterior and anterior ribs with cortical edges, clavicles;
- distractors in both classes: side marker, ECG leads and electrodes;
- acquisition: exponential attenuation at a random exposure, detector auto-windowing,
  gamma, Gaussian blur (focal spot/detector PSF), signal-dependent quantum noise plus
  electronic noise.

Positive class (``positive=True``): one or more consolidations inside the lungs, either
lobar (bounded on one side by a sharp fissure, air bronchograms) or patchy (clusters of
irregular blobs), of varied size (about 4-35 % of a lung) and density (faint to dense),
sometimes bilateral.

The output is float32 in [0, 1], bright = dense (the MONOCHROME2 sense), shape (rows,
columns). Anatomy, lesions and noise draw from separate streams of the seed, so
``generate(s, positive=True)`` and ``generate(s, positive=False)`` show the same patient
with and without disease.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Phantom", "batch", "generate", "generate_with_mask", "lesion_area_fraction"]

_REF = 224.0  # resolution at which noise and blur parameters are defined


@dataclass(frozen=True)
class Phantom:
    image: np.ndarray  # float32 [rows, cols] in [0, 1], bright = dense
    lesion_mask: np.ndarray  # float32 [rows, cols] in [0, 1]; all zero for negatives
    positive: bool
    seed: int


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _inside(f: np.ndarray, eps: float) -> np.ndarray:
    """Soft indicator of f < 0 with an edge width of about eps (normalised units)."""
    return _sigmoid(-f / eps)


def _gauss_filter_fft(img: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0:
        return img
    h, w = img.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kern = np.exp(-2.0 * (np.pi**2) * (sigma_px**2) * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(img) * kern, s=(h, w))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_norm: float) -> np.ndarray:
    """Zero-mean, unit-std correlated noise with a correlation length in normalised units."""
    sigma_px = sigma_norm * 0.5 * max(shape)
    n = _gauss_filter_fft(rng.standard_normal(shape), sigma_px)
    s = float(n.std())
    return (n / s if s > 0 else n).astype(np.float32)


class _Frame:
    """Pixel grid <-> patient frame mapping under a random similarity transform."""

    def __init__(self, rows: int, cols: int, rng: np.random.Generator) -> None:
        self.rows, self.cols = rows, cols
        self.theta = float(np.deg2rad(rng.uniform(-4.0, 4.0)))
        self.scale = float(rng.uniform(0.9, 1.06))
        self.shift = [float(v) for v in rng.uniform(-0.05, 0.05, size=2)]
        # float32 grids: half the memory traffic of float64, plenty for a phantom
        yy = (np.arange(rows, dtype=np.float32) + 0.5) / rows * 2.0 - 1.0
        xx = (np.arange(cols, dtype=np.float32) + 0.5) / cols * 2.0 - 1.0
        gx, gy = np.meshgrid(xx, yy)
        self.X, self.Y = self.to_patient(gx, gy)

    def to_patient(self, gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = float(np.cos(self.theta)), float(np.sin(self.theta))
        X = (c * gx + s * gy) / self.scale - self.shift[0]
        Y = (-s * gx + c * gy) / self.scale - self.shift[1]
        return X, Y

    def to_pixel(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = float(np.cos(self.theta)), float(np.sin(self.theta))
        a = (X + self.shift[0]) * self.scale
        b = (Y + self.shift[1]) * self.scale
        gx = c * a - s * b
        gy = s * a + c * b
        return (gy + 1.0) / 2.0 * self.rows - 0.5, (gx + 1.0) / 2.0 * self.cols - 0.5

    def window(self, pts: np.ndarray, margin: float) -> tuple[slice, slice] | None:
        """Pixel window covering patient-frame points `pts` [n, 2] plus a margin."""
        r, c = self.to_pixel(pts[:, 0], pts[:, 1])
        mr = margin * self.rows / 2.0 * self.scale + 2
        mc = margin * self.cols / 2.0 * self.scale + 2
        r0, r1 = int(max(0, np.floor(r.min() - mr))), int(min(self.rows, np.ceil(r.max() + mr) + 1))
        c0, c1 = int(max(0, np.floor(c.min() - mc))), int(min(self.cols, np.ceil(c.max() + mc) + 1))
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


def _add_segment(  # noqa: PLR0917
    acc: np.ndarray, fr: _Frame, p0: np.ndarray, p1: np.ndarray, width: float, amp: float
) -> None:
    """Add a Gaussian-profile line segment (a vessel, a wire) into acc (in place)."""
    win = fr.window(np.stack([p0, p1]), 3.0 * width)
    if win is None:
        return
    X, Y = fr.X[win], fr.Y[win]
    x0, y0 = float(p0[0]), float(p0[1])
    dx, dy = float(p1[0] - p0[0]), float(p1[1] - p0[1])
    L2 = dx * dx + dy * dy + 1e-12
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / L2, 0.0, 1.0)
    dist2 = (X - x0 - t * dx) ** 2 + (Y - y0 - t * dy) ** 2
    acc[win] += float(amp) * np.exp(-dist2 / float(width * width))


def _vessel_tree(  # noqa: PLR0917
    acc: np.ndarray,
    fr: _Frame,
    rng: np.random.Generator,
    hilum: np.ndarray,
    side: float,
    n: int,
    amp: float,
    width: float,
    depth: int = 3,
) -> None:
    for _ in range(n):
        # directions fan out laterally, up and down from the hilum
        ang = rng.uniform(-0.45 * np.pi, 0.55 * np.pi)
        direction = np.array([side * np.cos(ang) * 0.9, -np.sin(ang)])
        _branch(acc, fr, rng, hilum.copy(), direction, amp, width, depth)


def _branch(  # noqa: PLR0917
    acc: np.ndarray,
    fr: _Frame,
    rng: np.random.Generator,
    p: np.ndarray,
    direction: np.ndarray,
    amp: float,
    width: float,
    depth: int,
) -> None:
    if depth == 0 or amp < 0.005:
        return
    length = rng.uniform(0.09, 0.2)
    turn = rng.normal(0.0, 0.3)
    c, s = np.cos(turn), np.sin(turn)
    direction = np.array([c * direction[0] - s * direction[1], s * direction[0] + c * direction[1]])
    direction /= np.linalg.norm(direction) + 1e-12
    q = p + length * direction
    _add_segment(acc, fr, p, q, width, amp)
    _branch(acc, fr, rng, q, direction, amp * 0.72, width * 0.75, depth - 1)
    if rng.random() < 0.55:
        c2, s2 = np.cos(0.6 * np.sign(rng.normal())), np.sin(0.6 * np.sign(rng.normal()))
        d2 = np.array([c2 * direction[0] - s2 * direction[1], s2 * direction[0] + c2 * direction[1]])
        _branch(acc, fr, rng, q, d2, amp * 0.6, width * 0.65, depth - 1)


def _anatomy(fr: _Frame, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:  # noqa: PLR0915
    """Attenuation map (arbitrary units) and a soft lung mask."""
    X, Y = fr.X, fr.Y
    eps = 0.012
    A = np.zeros_like(X)

    # body and shoulders
    half_w = rng.uniform(0.86, 0.98) + 0.04 * Y
    shoulder_y = rng.uniform(-0.9, -0.8)
    neck = 0.28 + 0.62 * _sigmoid((Y - shoulder_y) / 0.05)
    width = np.minimum(half_w, neck + 0.0)
    body = _inside(np.abs(X) - width, eps * 1.5)
    thick = np.sqrt(np.clip(1.0 - (X / (width + 1e-6)) ** 2, 0.0, 1.0))
    A += body * (0.55 + 0.45 * thick) * rng.uniform(0.9, 1.1)

    # lungs
    lung = np.zeros_like(X)
    geo = {}
    for side in (-1.0, 1.0):
        u = side * X  # lateral coordinate, >0 towards this side's lateral chest wall
        uc = rng.uniform(0.42, 0.48)
        ru = rng.uniform(0.33, 0.39)
        top = rng.uniform(-0.82, -0.72)
        dome_base = rng.uniform(0.55, 0.68) + (0.05 if side > 0 else 0.0)
        dome_h = rng.uniform(0.15, 0.26)
        yc = 0.5 * (top + dome_base + 0.1)
        ry = 0.5 * (dome_base + 0.1 - top)
        p = 2.3
        f_ell = (((np.abs(u - uc) / ru) ** p + (np.abs(Y - yc) / ry) ** p) ** (1 / p) - 1.0) * min(ru, ry)
        dome = dome_base - dome_h * np.exp(-(((u - uc + 0.02) / 0.3) ** 2))
        f_dome = Y - dome
        med = rng.uniform(0.1, 0.14) + 0.05 * np.clip(Y, 0, 1)
        f_med = med - u
        f = np.maximum(np.maximum(f_ell, f_dome), f_med)
        m = _inside(f, eps)
        geo[side] = {"uc": uc, "ru": ru, "top": top, "dome": dome_base - dome_h, "yc": yc, "ry": ry}
        lung = np.maximum(lung, m)

    # heart (mostly on the patient's left = image right), aortic knob, mediastinum
    hx, hy = rng.uniform(0.1, 0.2), rng.uniform(0.22, 0.34)
    hrx, hry = rng.uniform(0.28, 0.4), rng.uniform(0.2, 0.27)
    ht = float(np.deg2rad(rng.uniform(-25, -5)))
    cx, cy = X - hx, Y - hy
    ch, sh = float(np.cos(ht)), float(np.sin(ht))
    hu = ch * cx + sh * cy
    hv = -sh * cx + ch * cy
    f_heart = (np.sqrt((hu / hrx) ** 2 + (hv / hry) ** 2) - 1.0) * min(hrx, hry)
    heart = _inside(f_heart, eps)
    lung = lung * (1.0 - heart)
    mediastinum = _inside(np.abs(X - 0.02) - (0.1 + 0.04 * np.clip(Y + 0.5, 0, 1.5)), eps) * _inside(-0.95 - Y, -eps)
    knob = _inside(np.sqrt((X - rng.uniform(0.1, 0.16)) ** 2 + (Y + rng.uniform(0.3, 0.38)) ** 2) - 0.07, eps)

    lung_depth = rng.uniform(0.5, 0.62) + 0.18 * np.clip((Y + 0.8) / 1.4, 0, 1)
    A -= lung * lung_depth
    A += heart * rng.uniform(0.04, 0.12) + mediastinum * 0.08 + knob * 0.08

    # air in the trachea; the spine
    trachea = _inside(np.abs(X - 0.01) - 0.035, eps * 0.7) * _inside(Y + 0.15, eps * 2)
    A -= trachea * 0.15
    spine = _inside(np.abs(X) - 0.075, eps)
    vert = 0.85 + 0.15 * np.cos(2 * np.pi * (Y - rng.uniform(0, 0.11)) / 0.11)
    A += spine * 0.18 * vert

    # ribs: posterior (periodic bands bowing downwards laterally) and fainter anterior ones
    ribs = np.zeros_like(X)
    warp = 0.015 * _smooth_noise(rng, X.shape, 0.25)
    sp = rng.uniform(0.125, 0.145)
    y0 = rng.uniform(-0.86, -0.8)
    for side in (-1.0, 1.0):
        u = side * X
        in_u = _inside(0.06 - u, 0.01) * _inside(u - 0.9, 0.02)
        d0 = Y - (-0.25 * u + 0.75 * u * u) + warp
        t = (d0 - y0) / sp
        k = np.floor(t)
        frac = t - k
        hw = 0.15 + 0.01 * np.clip(k, 0, 9)  # fraction of the spacing covered by a rib
        band = _inside(np.abs(frac - hw) - hw, 0.04)
        edge = np.exp(-((frac / 0.05) ** 2)) + np.exp(-(((frac - 2 * hw) / 0.05) ** 2))
        valid = ((k >= 0) & (k <= 9)).astype(np.float32)
        ribs += in_u * valid * (band * 0.045 + edge * band * 0.035)
        # anterior ribs: run down-medially from the lateral wall, fainter
        da = Y - (0.25 * (0.85 - u) ** 2 * 2.0) + warp
        ta = (da - y0 - 0.05) / (sp * 1.1)
        ka = np.floor(ta)
        fa = ta - ka
        band_a = _inside(np.abs(fa - 0.15) - 0.15, 0.05)
        valid_a = ((ka >= 0) & (ka <= 6)).astype(np.float32) * _inside(0.25 - u, 0.05)
        ribs += in_u * valid_a * band_a * 0.03
    A += ribs * body

    # clavicles
    for side in (-1.0, 1.0):
        u = side * X
        cy0 = rng.uniform(-0.74, -0.66)
        yc = cy0 - 0.2 * u + 0.05 * np.sin(np.pi * u / 0.7)
        clav = _inside(np.abs(Y - yc) - 0.03, 0.01) * _inside(0.05 - u, 0.01) * _inside(u - 0.72, 0.02)
        A += clav * 0.22

    # vascular markings
    vessels = np.zeros_like(X)
    for side in (-1.0, 1.0):
        hilum = np.array([side * rng.uniform(0.18, 0.24), rng.uniform(-0.12, 0.0)])
        _vessel_tree(
            vessels,
            fr,
            rng,
            hilum,
            side,
            n=int(rng.integers(9, 15)),
            amp=rng.uniform(0.045, 0.075),
            width=rng.uniform(0.014, 0.022),
        )
        hil = np.sqrt(((X - hilum[0]) / 0.07) ** 2 + ((Y - hilum[1] - 0.03) / 0.11) ** 2) - 1.0
        vessels += _inside(hil * 0.07, 0.02) * rng.uniform(0.05, 0.1)
    A += vessels * (0.1 + 0.9 * lung)

    # breast shadows (both classes)
    if rng.random() < 0.35:
        size = rng.uniform(0.28, 0.42)
        for side in (-1.0, 1.0):
            u = side * X
            f = np.sqrt(((u - 0.5) / size) ** 2 + ((Y - rng.uniform(0.5, 0.65)) / (size * 0.8)) ** 2) - 1.0
            A += _inside(f * size, 0.03) * _inside(-0.5 - (Y - 0.5) * 3, 0.2) * rng.uniform(0.08, 0.18)

    return A, lung, {"geo": geo, "body": body}


def _lesions(fr: _Frame, rng: np.random.Generator, lung: np.ndarray, geo: dict) -> np.ndarray:
    """Soft consolidation density map (0 = none), confined to the lungs."""
    X, Y = fr.X, fr.Y
    dens = np.zeros_like(X)
    n_sites = 1 if rng.random() < 0.75 else 2
    sides = rng.choice([-1.0, 1.0], size=n_sites, replace=n_sites == 1)
    tex = _smooth_noise(rng, X.shape, 0.03)
    for side in (float(v) for v in sides):
        g = geo[side]
        u = side * X
        zone = rng.choice(["upper", "middle", "lower"], p=[0.25, 0.3, 0.45])
        zy = {
            "upper": g["top"] + 0.25 * (g["dome"] - g["top"]),
            "middle": g["top"] + 0.55 * (g["dome"] - g["top"]),
            "lower": g["top"] + 0.82 * (g["dome"] - g["top"]),
        }[zone] + rng.uniform(-0.06, 0.06)
        zu = g["uc"] + rng.uniform(-0.12, 0.15)
        density = rng.uniform(0.18, 0.6)
        size = rng.uniform(0.07, 0.3)
        if rng.random() < 0.45:
            # lobar: smooth irregular region with a sharp fissure edge, air bronchograms
            f = np.sqrt(((u - zu) / (size * 1.2)) ** 2 + ((Y - zy) / size) ** 2) - 1.0
            f = f + 0.25 * _smooth_noise(rng, X.shape, 0.06)
            region = _inside(f * size, 0.02)
            ang = rng.uniform(-0.5, 0.5)
            fis = (Y - zy + rng.uniform(0.0, 0.6) * size) * np.cos(ang) - (u - zu) * np.sin(ang)
            upper_bound = rng.random() < 0.5
            region = region * _inside((-fis if upper_bound else fis) * 1.0, 0.006)
            local = region * (0.8 + 0.2 * tex)
            bronch = np.zeros_like(X)
            for _ in range(int(rng.integers(2, 6))):
                p0 = np.array([side * (zu + rng.uniform(-0.5, 0.5) * size), zy + rng.uniform(-0.5, 0.5) * size])
                ang2 = rng.uniform(0, 2 * np.pi)
                p1 = p0 + rng.uniform(0.4, 0.9) * size * np.array([np.cos(ang2), np.sin(ang2)])
                _add_segment(bronch, fr, p0, p1, 0.007, 1.0)
            local = local * (1.0 - 0.45 * np.clip(bronch, 0, 1))
        else:
            # patchy: a cluster of irregular blobs
            local = np.zeros_like(X)
            for _ in range(int(rng.integers(3, 9))):
                bu = zu + rng.normal(0, size * 0.7)
                by = zy + rng.normal(0, size * 0.6)
                r = size * rng.uniform(0.25, 0.6)
                f = np.sqrt((u - bu) ** 2 + (Y - by) ** 2) / r - 1.0 + 0.35 * tex
                local = np.maximum(local, _inside(f * r, 0.015) * rng.uniform(0.6, 1.0))
            local = local * (0.75 + 0.25 * tex)
        dens = np.maximum(dens, density * np.clip(local, 0, 1))
    return dens * lung


def _devices(fr: _Frame, rng: np.random.Generator, A: np.ndarray) -> None:
    """Side marker, ECG electrodes and leads: present in both classes."""
    X, Y = fr.X, fr.Y
    if rng.random() < 0.7:
        mx, my = float(rng.choice([-0.85, 0.85])), float(rng.uniform(-0.9, -0.7))
        A += 0.9 * _inside(np.maximum(np.abs(X - mx) - 0.035, np.abs(Y - my) - 0.05), 0.004)
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(2, 5))):
            e = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.6, 0.5)])
            A += 0.5 * _inside(np.sqrt((X - e[0]) ** 2 + (Y - e[1]) ** 2) - 0.03, 0.004)
            end = np.array([rng.uniform(-1.0, 1.0), rng.choice([-1.1, 1.1])])
            mid = 0.5 * (e + end) + rng.normal(0, 0.15, 2)
            wire = np.zeros_like(X)
            _add_segment(wire, fr, e, mid, 0.006, 1.0)
            _add_segment(wire, fr, mid, end, 0.006, 1.0)
            A += 0.35 * np.clip(wire, 0, 1)


def _acquire(A: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = A.shape
    res = max(h, w) / _REF
    mu = rng.uniform(0.7, 1.3)  # exposure / beam quality
    img = 1.0 - np.exp(-mu * np.clip(A + 0.05, 0.0, None))
    lo = float(np.quantile(img, rng.uniform(0.002, 0.03)))
    hi = float(np.quantile(img, rng.uniform(0.985, 0.999)))
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    img = img ** rng.uniform(0.75, 1.3)
    img = _gauss_filter_fft(img, rng.uniform(0.3, 1.0) * res)
    # Per-pixel noise grows with sqrt(resolution): a large phantom downsampled to 224 is a
    # little cleaner than a 224 phantom, never noisier.
    q = rng.uniform(0.01, 0.035) * np.sqrt(res)  # quantum noise, grows with the signal
    e = rng.uniform(0.003, 0.012) * np.sqrt(res)  # electronic noise
    noise = rng.standard_normal(A.shape) * np.sqrt(q * q * np.clip(img, 0, 1) + e * e)
    return np.clip(img + noise, 0.0, 1.0)


def generate_with_mask(seed: int, positive: bool, rows: int = 224, columns: int | None = None) -> Phantom:
    """One phantom and its lesion mask. Same seed and arguments => identical arrays."""
    if columns is None:
        columns = rows
    if not (16 <= rows <= 8192 and 16 <= columns <= 8192):
        raise ValueError("rows and columns must be within 16..8192")
    seed = int(seed)
    rng_anat = np.random.default_rng([seed, 0x0A7])
    rng_les = np.random.default_rng([seed, 0x1E5])
    rng_acq = np.random.default_rng([seed, 0xAC9])
    fr = _Frame(rows, columns, rng_anat)
    A, lung, info = _anatomy(fr, rng_anat)
    _devices(fr, rng_anat, A)
    lesion = np.zeros_like(A)
    mask = np.zeros_like(A)
    if positive:
        # A lesion drawn mostly outside the lungs would leave a "positive" without a visible
        # finding; redraw (from the same stream, so still deterministic) until it covers at
        # least 0.2 % of the image with density > 0.05.
        min_area = 0.002 * rows * columns
        for _ in range(20):
            lesion = _lesions(fr, rng_les, lung, info["geo"])
            if np.count_nonzero(lesion > 0.05) >= min_area:
                break
        # consolidation replaces air: up to the lung's own air deficit
        A = A + lesion
        mask = np.clip(lesion / max(0.5 * float(lesion.max()), 1e-6), 0.0, 1.0)
    img = _acquire(A, rng_acq).astype(np.float32)
    mask = mask.astype(np.float32)
    return Phantom(image=img, lesion_mask=mask, positive=bool(positive), seed=seed)


def generate(seed: int, positive: bool, rows: int = 224, columns: int | None = None) -> np.ndarray:
    """float32 [rows, columns] in [0, 1], bright = dense (MONOCHROME2 sense)."""
    return generate_with_mask(seed, positive, rows, columns).image


def lesion_area_fraction(seed: int, rows: int = 224) -> float:
    """Fraction of the image covered by the positive phantom's consolidation (mask > 0.5)."""
    return float(np.mean(generate_with_mask(seed, True, rows).lesion_mask > 0.5))


def batch(seeds: list[int] | np.ndarray, labels: list[int] | np.ndarray, size: int = 224) -> np.ndarray:
    """Stack phantoms into a float32 [N, 1, size, size] array (the model's input layout)."""
    out = np.empty((len(seeds), 1, size, size), dtype=np.float32)
    for i, (s, y) in enumerate(zip(seeds, labels, strict=True)):
        out[i, 0] = generate(int(s), bool(y), size)
    return out
