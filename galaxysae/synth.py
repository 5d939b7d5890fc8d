"""Job ``synth``: a gz_euclid-shaped dataset of procedural galaxies whose votes follow their looks.

Data flow: per galaxy, a private RNG (seeded by ``seed``, split and index, so a galaxy does not
depend on shard size or worker count) draws morphology parameters -> the renderer paints a
3-channel image (bulge, disk, spiral arms, bar, clumps, companions and tidal tails, foreground
stars, artifacts, sky noise) -> JPEG bytes; the same parameters give each question's answer
probabilities, and simulated volunteers walk the Galaxy Zoo decision tree (multinomial votes,
with per-galaxy disagreement) -> counts, fractions, total votes -> parquet shards
``data/{split}-NNNNN-of-NNNNN.parquet`` plus a ``tiny`` subset and a README declaring both
configs, exactly as ``mwalmsley/gz_euclid`` is laid out (DESIGN.md §3).

Label convention: a question nobody was asked (``{q}_total-votes == 0``) has NaN fractions
(the counts are 0); where it was asked, its fractions are ``count / total-votes`` and sum to 1.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from galaxysae import config, schema, storage

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 0, "test": 1}
# Settings that change the bytes written: a rerun into the same folder must agree on them.
_GENERATION_KEYS = ("n_train", "n_test", "seed", "image_size", "shard_size", "jpeg_quality", "tiny_fraction",
                    "corrupt")


@dataclass
class Config:
    """Generate a dataset in the layout and schema of mwalmsley/gz_euclid from procedural galaxies."""

    out: str = field(default="", metadata={"help": "output folder or s3:// prefix (required)"})
    n_train: int = field(default=1000, metadata={"help": "galaxies in the train split"})
    n_test: int = field(default=200, metadata={"help": "galaxies in the test split"})
    seed: int = field(default=0, metadata={"help": "same seed -> byte-identical shards"})
    image_size: int = field(default=224, metadata={"help": "image side in pixels (gz_euclid: 224+)"})
    shard_size: int = field(default=500, metadata={"help": "max galaxies per parquet shard"})
    jpeg_quality: int = field(default=90, metadata={"help": "JPEG quality (1-95)"})
    tiny_fraction: float = field(
        default=0.1, metadata={"help": "share of each split copied to the 'tiny' config (at least 8 rows)"}
    )
    workers: int = field(default=0, metadata={"help": "processes rendering galaxies (0: one per CPU, max 8)"})
    corrupt: int = field(
        default=0, metadata={"help": "this many train galaxies get truncated JPEG bytes (to test failure handling)"}
    )

    def validate(self) -> None:
        if not self.out:
            raise ValueError("key 'out' is required (an output folder or s3:// prefix)")
        if self.n_train < 1:
            raise ValueError(f"key 'n_train' must be >= 1, got {self.n_train}")
        if self.n_test < 0:
            raise ValueError(f"key 'n_test' must be >= 0, got {self.n_test}")
        if self.seed < 0:
            raise ValueError(f"key 'seed' must be >= 0, got {self.seed}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"key 'image_size' must be between 32 and 1024, got {self.image_size}")
        if self.shard_size < 1:
            raise ValueError(f"key 'shard_size' must be >= 1, got {self.shard_size}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"key 'jpeg_quality' must be between 1 and 95, got {self.jpeg_quality}")
        if not 0.0 < self.tiny_fraction <= 1.0:
            raise ValueError(f"key 'tiny_fraction' must be in (0, 1], got {self.tiny_fraction}")
        if not 0 <= self.corrupt <= self.n_train:
            raise ValueError(f"key 'corrupt' must be between 0 and n_train ({self.n_train}), got {self.corrupt}")
        if self.workers < 0:
            raise ValueError(f"key 'workers' must be >= 0, got {self.workers}")


# ============================================================================ morphology parameters

_ELLIPTICAL, _DISK, _PROBLEM = "elliptical", "disk", "problem"
_ARTIFACTS = schema.QUESTIONS["artifact-euclid"]


def galaxy_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The private RNG of one galaxy: independent of sharding and of the other galaxies."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


def sample_params(rng: np.random.Generator) -> dict:
    """Draw the morphology of one galaxy. Lengths are in units of the image side."""
    p: dict = {}
    kind = rng.choice([_ELLIPTICAL, _DISK, _PROBLEM], p=[0.34, 0.58, 0.08])
    p["kind"] = str(kind)
    p["pa"] = float(rng.uniform(0, np.pi))
    p["center"] = rng.normal(0.0, 0.008, size=2)
    p["brightness"] = float(rng.uniform(0.7, 1.4))
    p["r_e"] = float(rng.uniform(0.09, 0.16))
    # defaults, overwritten below
    p.update(bt=1.0, q=1.0, arms=0, arm_amp=0.0, pitch=20.0, bar=0.0, clumps=0, clump_amp=0.0,
             edge_on=False, bulge_shape="rounded", merging=0, problem=None, artifact=None, zoom=None)
    if kind == _ELLIPTICAL:
        p["q"] = float(rng.uniform(0.3, 1.0))
        p["sersic_n"] = float(rng.uniform(2.5, 4.5))
        p["r_e"] *= 1.25  # concentrated profiles look smaller than disks of the same half-light radius
    elif kind == _DISK:
        cos_i = float(rng.uniform(0.04, 1.0))
        q0 = 0.1  # intrinsic thickness
        p["q"] = float(math.sqrt(cos_i**2 * (1 - q0**2) + q0**2))
        p["edge_on"] = p["q"] < 0.3
        p["bt"] = float(np.clip(rng.beta(1.3, 3.0) * 0.95, 0.0, 0.9))
        p["sersic_n"] = float(rng.uniform(1.0, 3.0))
        p["h"] = float(rng.uniform(0.5, 0.8))  # disk scale length / r_e
        p["bulge_r"] = float(rng.uniform(0.2, 0.4))  # bulge radius / r_e
        if p["bt"] < 0.65 and rng.random() < 0.7:
            p["arms"] = int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.05, 0.5, 0.2, 0.12, 0.08, 0.05]))
            p["arm_amp"] = float(rng.uniform(0.35, 1.0))
            p["pitch"] = float(rng.uniform(8.0, 40.0))
        if rng.random() < 0.35:
            p["bar"] = float(rng.uniform(0.3, 1.0))
            p["bar_angle"] = float(rng.uniform(0, np.pi))
        if rng.random() < 0.25:
            p["clumps"] = int(rng.integers(3, 9))
            p["clump_amp"] = float(rng.uniform(0.4, 1.0))
        # Boxy/peanut bulges are bars seen side-on.
        p["bulge_shape"] = "none" if p["bt"] < 0.06 else ("boxy" if p["bar"] > 0 else "rounded")
    else:
        p["problem"] = str(rng.choice(["star", "artifact", "zoom"], p=[0.35, 0.45, 0.2]))
        p["q"] = float(rng.uniform(0.4, 1.0))
        p["sersic_n"] = float(rng.uniform(1.0, 4.0))
        p["brightness"] *= 0.5
        if p["problem"] == "artifact":
            p["artifact"] = str(rng.choice(_ARTIFACTS, p=[0.22, 0.14, 0.2, 0.12, 0.12, 0.1, 0.1]))
        elif p["problem"] == "zoom":
            p["zoom"] = str(rng.choice(["small", "large"]))
            p["r_e"] = 0.012 if p["zoom"] == "small" else float(rng.uniform(0.45, 0.6))
            p["brightness"] *= 2.0
    if kind != _PROBLEM:
        p["merging"] = int(rng.choice([0, 1, 2, 3], p=[0.7, 0.12, 0.1, 0.08]))
    # Nuisances any image may carry: foreground stars (bright ones with diffraction spikes) and,
    # rarely, a satellite trail. They do not change what the galaxy is.
    p["n_stars"] = int(rng.poisson(0.8))
    p["trail"] = bool(rng.random() < 0.03)
    return p


# ============================================================================ rendering


def _rot(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return x * c + y * s, -x * s + y * c


def _sersic(r: np.ndarray, r_e: float, n: float) -> np.ndarray:
    b = 2.0 * n - 1.0 / 3.0
    return np.exp(-b * ((r / r_e) ** (1.0 / n) - 1.0))


def _unit(img: np.ndarray) -> np.ndarray:
    """Scale a profile to unit total flux (a profile entirely off the image stays 0)."""
    s = float(img.sum())
    return img / s if s > 0 else img


def _blobs(x, y, cx, cy, sigma) -> np.ndarray:
    """Sum of round Gaussians. x, y: (H, W); cx, cy, sigma: (K,) -> (H, W)."""
    out = np.zeros_like(x)
    for i in range(len(cx)):  # K is small; a (K, H, W) array would cost more memory than time
        out += np.exp(-((x - cx[i]) ** 2 + (y - cy[i]) ** 2) / (2 * sigma[i] ** 2))
    return out


def _tail(x, y, x0, y0, radius, start, sweep, width, n=24) -> np.ndarray:
    """A tidal tail: Gaussian brush strokes along a fading circular arc. -> (H, W)."""
    t = np.linspace(0.0, 1.0, n)
    ang = start + sweep * t
    cx = x0 + radius * np.cos(ang) - radius * math.cos(start)
    cy = y0 + radius * np.sin(ang) - radius * math.sin(start)
    out = np.zeros_like(x)
    for i in range(n):
        out += (1.0 - 0.8 * t[i]) * np.exp(-((x - cx[i]) ** 2 + (y - cy[i]) ** 2) / (2 * (width * (1 + t[i])) ** 2))
    return out


def _line(x, y, x0, y0, angle, width) -> np.ndarray:
    """Distance-based profile of an infinite line through (x0, y0). -> (H, W)."""
    d = -(x - x0) * math.sin(angle) + (y - y0) * math.cos(angle)
    return np.exp(-0.5 * (d / width) ** 2)


def _star(x, y, x0, y0, flux, psf, spikes: bool) -> np.ndarray:
    """A foreground star: Moffat-like PSF, plus Euclid's six diffraction spikes when bright."""
    r2 = (x - x0) ** 2 + (y - y0) ** 2
    img = flux * _unit((1 + r2 / psf**2) ** -2.5)
    if spikes:
        r = np.sqrt(r2) + psf
        for k in range(3):
            ang = k * math.pi / 3 + math.pi / 6
            img += flux * 0.02 * _line(x, y, x0, y0, ang, 0.6 * psf) * (psf / r) ** 1.2
    return img


_RED = np.array([1.0, 0.8, 0.58], np.float32)
_YELLOW = np.array([1.0, 0.9, 0.75], np.float32)
_BLUE = np.array([0.62, 0.78, 1.0], np.float32)
_WHITE = np.array([1.0, 1.0, 1.0], np.float32)


def render(p: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Paint one galaxy. -> uint8 array (size, size, 3)."""
    ax = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    x, y = np.meshgrid(ax, ax)  # image-side units, origin at the centre; y grows downwards
    px = 1.0 / size
    flux = np.zeros((size, size, 3), np.float32)
    cx, cy = p["center"]
    xc, yc = x - cx, y - cy
    r_e = p["r_e"]
    # Total flux grows with area so that surface brightness does not depend on size.
    total = p["brightness"] * 40.0 * (r_e / 0.1) ** 2
    u, v = _rot(xc, yc, p["pa"])  # u along the major axis

    if p["kind"] == _DISK:
        q = p["q"]
        vd = v / q  # disk-plane coordinates
        rd = np.sqrt(u**2 + vd**2) + 0.5 * px
        h = p["h"] * r_e
        disk = np.exp(-rd / h)
        if p["arms"]:
            theta = np.arctan2(vd, u)
            phase = theta - np.log(rd / h) / math.tan(math.radians(p["pitch"]))
            pattern = ((1 + np.cos(p["arms"] * phase)) / 2) ** 3
            ring = 1 - np.exp(-((rd / (0.9 * h)) ** 2))  # arms fade into the bulge
            a = p["arm_amp"] * ring
            disk = disk * ((1 - a) + a * pattern / 0.3125)  # mean of pattern is 5/16
        if p["edge_on"] or q < 0.45:
            # A dust lane along the midplane: the thing that makes an edge-on disk edge-on.
            thick = max(q, 0.1) * h * 0.5
            disk = disk * (1 - 0.65 * np.exp(-0.5 * (v / (0.35 * thick + px)) ** 2) * np.exp(-((u / (3 * h)) ** 2)))
        flux += (total * (1 - p["bt"])) * _unit(disk)[..., None] * _BLUE
        if p["bar"] > 0:
            bu, bv = _rot(u, vd, p["bar_angle"])
            length = r_e * (0.5 + 0.5 * p["bar"])
            bar = np.exp(-((bu / length) ** 4) - (bv / (0.22 * length)) ** 2)
            flux += (total * 0.25 * p["bar"] * (1 - p["bt"])) * _unit(bar)[..., None] * _YELLOW
        if p["clumps"]:
            k = p["clumps"]
            rad = rng.uniform(0.6, 2.4, k) * h
            ang = rng.uniform(0, 2 * np.pi, k)
            du, dv = rad * np.cos(ang), rad * np.sin(ang) * q
            c, s = math.cos(p["pa"]), math.sin(p["pa"])
            bx, by = cx + du * c - dv * s, cy + du * s + dv * c
            sig = rng.uniform(1.0, 2.0, k) * max(px, 0.006)
            clumps = _blobs(x, y, bx, by, sig)
            flux += (total * 0.12 * p["clump_amp"]) * _unit(clumps)[..., None] * _WHITE
        if p["bt"] > 0:
            rb = np.sqrt(u**2 + (v / max(q, 0.6)) ** 2) + 0.5 * px
            if p["bulge_shape"] == "boxy":
                rb = (np.abs(u) ** 4 + np.abs(v / max(q, 0.6)) ** 4) ** 0.25 + 0.5 * px
            bulge = _sersic(rb, p["bulge_r"] * r_e, p["sersic_n"])
            flux += (total * p["bt"]) * _unit(bulge)[..., None] * _RED
    else:
        r = np.sqrt(u**2 + (v / p["q"]) ** 2) + 0.5 * px
        body = _sersic(r, r_e, p["sersic_n"])
        flux += total * _unit(body)[..., None] * (_RED if p["kind"] == _ELLIPTICAL else _YELLOW)

    m = p["merging"]
    if m:
        # 1: a small companion; 2: a big one with tidal tails; 3: two nuclei in one envelope.
        ratio = {1: rng.uniform(0.1, 0.25), 2: rng.uniform(0.3, 0.8), 3: rng.uniform(0.6, 1.0)}[m]
        dist = {1: rng.uniform(1.6, 2.6), 2: rng.uniform(1.1, 1.8), 3: rng.uniform(0.35, 0.7)}[m] * r_e
        ang = rng.uniform(0, 2 * np.pi)
        ox, oy = cx + dist * math.cos(ang), cy + dist * math.sin(ang)
        cu, cv = _rot(x - ox, y - oy, rng.uniform(0, np.pi))
        cre = r_e * math.sqrt(ratio) * 0.8
        comp = _sersic(np.sqrt(cu**2 + (cv / rng.uniform(0.5, 1.0)) ** 2) + 0.5 * px, cre, 2.0)
        flux += (total * ratio) * _unit(comp)[..., None] * _YELLOW
        if m >= 2:
            for sign in (1.0, -1.0):
                tail = _tail(x, y, cx if sign > 0 else ox, cy if sign > 0 else oy, r_e * rng.uniform(1.5, 3.0),
                             ang + sign * np.pi / 2, sign * rng.uniform(1.0, 2.2), r_e * 0.18)
                flux += (total * (0.12 if m == 2 else 0.2)) * _unit(tail)[..., None] * _BLUE

    psf = 1.3 * max(px, 1.0 / 224)
    for _ in range(p["n_stars"]):
        sx, sy = rng.uniform(-0.48, 0.48, 2)
        if abs(sx) < 1.5 * r_e and abs(sy) < 1.5 * r_e:
            sx, sy = sx + math.copysign(2.0 * r_e, sx), sy  # keep stars off the galaxy's core
        sflux = total * 10 ** rng.uniform(-2.0, -0.3)
        flux += _star(x, y, sx, sy, sflux, psf, spikes=sflux > 0.15 * total)[..., None] * _WHITE

    problem, artifact = p["problem"], p["artifact"]
    if problem == "star":
        flux += _star(x, y, cx, cy, total * rng.uniform(4, 10), psf * 1.5, spikes=True)[..., None] * _WHITE
    if p["trail"] or artifact == "satellite":
        amp = 0.9 if artifact == "satellite" else 0.35
        line = _line(x, y, *rng.uniform(-0.3, 0.3, 2), rng.uniform(0, np.pi), 0.6 * psf)
        flux += amp * line[..., None] * _WHITE
    if artifact == "scattered":
        sx, sy = rng.uniform(-1, 1, 2)
        sx, sy = (sx, math.copysign(0.8, sy)) if abs(sx) < 0.8 else (sx, sy)
        glow = np.exp(-np.sqrt((x - sx) ** 2 + (y - sy) ** 2) / 0.35)
        flux += 0.8 * glow[..., None] * _YELLOW
    elif artifact == "diffraction":
        sx, sy = rng.uniform(-0.25, 0.25, 2)
        flux += _star(x, y, sx, sy, total * 6, psf * 1.5, spikes=True)[..., None] * _WHITE
    elif artifact == "ray":
        for _ in range(int(rng.integers(3, 8))):  # cosmic-ray hits: short, sharp, colourless
            sx, sy = rng.uniform(-0.45, 0.45, 2)
            a, ln = rng.uniform(0, np.pi), rng.uniform(0.03, 0.12)
            along = (x - sx) * math.cos(a) + (y - sy) * math.sin(a)
            flux += (2.0 * _line(x, y, sx, sy, a, 0.4 * px) * (np.abs(along) < ln))[..., None] * _WHITE
    elif artifact == "saturation":
        sx, sy = rng.uniform(-0.2, 0.2, 2)
        flux += _star(x, y, sx, sy, total * 8, psf * 2, spikes=False)[..., None] * _WHITE
        bleed = np.exp(-0.5 * ((x - sx) / (1.2 * px)) ** 2) * (np.abs(y - sy) < rng.uniform(0.15, 0.4))
        flux += 3.0 * bleed[..., None] * _WHITE
    elif artifact == "ghost":
        gx, gy = rng.uniform(-0.25, 0.25, 2)
        rr = np.sqrt((x - gx) ** 2 + (y - gy) ** 2)
        ring = np.exp(-0.5 * ((rr - rng.uniform(0.12, 0.25)) / 0.03) ** 2)
        flux += 0.25 * ring[..., None] * _YELLOW

    # Sky and detector noise, then an asinh stretch like the survey's colour composites.
    flux += rng.normal(0.0, 0.012, size=flux.shape).astype(np.float32)
    img = np.arcsinh(np.maximum(flux, 0) / 0.03) / math.asinh(2.0 / 0.03)
    if artifact == "other":
        # A masked block: missing data, drawn as the survey leaves it (flat zero).
        h0, w0 = rng.integers(0, size // 2, 2)
        img[h0:h0 + size // 3, w0:w0 + size // 2] = 0.0
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ============================================================================ volunteers


def _softmax_near(value: float, centres, width: float) -> np.ndarray:
    logits = -(((value - np.asarray(centres, np.float64)) / width) ** 2)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _onehotish(index: int, n: int, main: float) -> np.ndarray:
    out = np.full(n, (1 - main) / (n - 1))
    out[index] = main
    return out


def answer_probs(p: dict) -> dict[str, np.ndarray]:
    """What a volunteer who is asked each question would answer, given the galaxy's looks.

    -> {question: probabilities over ``schema.QUESTIONS[question]`` (sums to 1)}.
    """
    kind, q, bt = p["kind"], p["q"], p["bt"]
    probs: dict[str, np.ndarray] = {}
    face_on = float(np.clip((q - 0.25) / 0.5, 0, 1))
    arm_vis = p["arm_amp"] * face_on * (1 - 0.5 * bt) if p["arms"] else 0.0
    bar_vis = p["bar"] * face_on
    clump_vis = p["clump_amp"] * (1 - 0.5 * bt) if p["clumps"] else 0.0
    nuisance = 0.04 * min(p["n_stars"], 3) + (0.15 if p["trail"] else 0.0)

    if kind == _PROBLEM:
        sf = np.array([0.1, 0.06, 0.84])
    elif kind == _ELLIPTICAL:
        sf = np.array([0.88, 0.08 + 0.1 * (p["merging"] >= 2), 0.03 + nuisance])
    else:
        structure = max(arm_vis, bar_vis, clump_vis, 1.0 if p["edge_on"] else 0.0)
        feat = float(np.clip(0.15 + 0.8 * (1 - bt) * (0.35 + 0.65 * structure), 0.05, 0.95))
        sf = np.array([1 - feat, feat, 0.03 + nuisance])
    probs["smooth-or-featured-euclid"] = sf / sf.sum()

    edge = float(np.clip(1 / (1 + math.exp((q - 0.3) / 0.05)), 0.03, 0.97))
    probs["disk-edge-on-euclid"] = np.array([edge, 1 - edge])
    spiral = 0.07 + 0.88 * min(1.0, 1.2 * arm_vis)
    probs["has-spiral-arms-euclid"] = np.array([spiral, 1 - spiral])
    s = float(np.clip(bar_vis, 0, 1))
    bar = np.array([0.03 + 0.85 * s**1.5, 0.1 + 0.6 * (s > 0) * (1 - s) + 0.2 * s, 0.0])
    bar[2] = max(0.05, 1 - bar[:2].sum())
    probs["bar-euclid"] = bar / bar.sum()
    probs["bulge-size-euclid"] = _softmax_near(bt, [0.72, 0.48, 0.3, 0.14, 0.02], 0.09)
    probs["how-rounded-euclid"] = _softmax_near(q, [0.92, 0.65, 0.35], 0.12)
    shape = {"boxy": 0, "none": 1, "rounded": 2}[p["bulge_shape"]]
    probs["edge-on-bulge-euclid"] = _onehotish(shape, 3, 0.7)
    if p["arms"]:
        probs["spiral-winding-euclid"] = _softmax_near(p["pitch"], [10.0, 20.0, 32.0], 7.0)
        count = _onehotish(min(p["arms"], 5) - 1, 6, 0.62)
        count[5] += 0.35 * (1 - arm_vis)  # faint arms are hard to count
        probs["spiral-arm-count-euclid"] = count / count.sum()
    else:
        probs["spiral-winding-euclid"] = np.array([0.45, 0.35, 0.2])
        probs["spiral-arm-count-euclid"] = np.array([0.08, 0.2, 0.04, 0.02, 0.02, 0.64])
    merging = _onehotish(p["merging"], 4, 0.72)
    probs["merging-euclid"] = merging
    clumps = 0.05 + 0.85 * clump_vis
    probs["clumps-euclid"] = np.array([clumps, 1 - clumps])
    if p["problem"]:
        probs["problem-euclid"] = _onehotish(["star", "artifact", "zoom"].index(p["problem"]), 3, 0.8)
    else:
        probs["problem-euclid"] = np.array([0.3 + 0.4 * (p["n_stars"] > 0), 0.3 + 0.5 * p["trail"], 0.4])
        probs["problem-euclid"] /= probs["problem-euclid"].sum()
    if p["artifact"]:
        probs["artifact-euclid"] = _onehotish(_ARTIFACTS.index(p["artifact"]), 7, 0.75)
    elif p["trail"]:
        probs["artifact-euclid"] = _onehotish(0, 7, 0.7)
    else:
        probs["artifact-euclid"] = _onehotish(_ARTIFACTS.index("other"), 7, 0.55)
    return probs


def vote(probs: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, int]:
    """Volunteers walk the decision tree. -> {count column: votes}, {total column: votes}."""
    out: dict[str, int] = {}
    n_root = int(rng.integers(20, 46))
    for q, answers in schema.QUESTIONS.items():
        parents = schema.ASKED_WHEN[q]
        total = n_root if parents is None else sum(out[c] for c in parents)
        # Volunteers disagree more than a multinomial alone says: each galaxy draws its own mix.
        mix = rng.dirichlet(30.0 * probs[q] + 0.05)
        counts = rng.multinomial(total, mix) if total > 0 else np.zeros(len(answers), np.int64)
        out[schema.total_column(q)] = total
        for a, c in zip(answers, counts):
            out[schema.count_column(q, a)] = int(c)
    return out


# ============================================================================ rows and shards


def galaxy_id(seed: int, split: str, index: int) -> str:
    return f"gzsynth-s{seed}-{split}-{index:07d}"


def make_galaxy(seed: int, split: str, index: int, size: int, quality: int) -> tuple[dict, dict]:
    """One row: ({column: value}, morphology parameters)."""
    from PIL import Image

    rng = galaxy_rng(seed, split, index)
    params = sample_params(rng)
    pixels = render(params, size, rng)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    gid = galaxy_id(seed, split, index)
    row: dict = {"image": {"bytes": buf.getvalue(), "path": f"{gid}.jpg"}, "id_str": gid}
    row.update(vote(answer_probs(params), rng))
    return row, params


def corrupt_indices(cfg: Config) -> list[int]:
    """Train indices whose JPEG bytes are truncated on purpose (``cfg.corrupt`` of them)."""
    if not cfg.corrupt:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 99]))
    return sorted(int(i) for i in rng.choice(cfg.n_train, cfg.corrupt, replace=False))


def _rows(args: tuple) -> list[dict]:
    seed, split, start, stop, size, quality, corrupt = args
    rows = []
    for i in range(start, stop):
        row = make_galaxy(seed, split, i, size, quality)[0]
        if i in corrupt:
            # A download cut short: a real JPEG header, then nothing. Its labels stay valid.
            row["image"]["bytes"] = row["image"]["bytes"][: len(row["image"]["bytes"]) // 3]
        rows.append(row)
    return rows


def features_dict() -> dict:
    """The ``datasets`` Features of a gz_euclid shard, as ``Features.to_dict()`` writes them."""
    feats: dict = {"image": {"_type": "Image"}, "id_str": {"dtype": "string", "_type": "Value"}}
    fractions = set(schema.fraction_columns())
    for col in schema.label_columns():
        feats[col] = {"dtype": "float32" if col in fractions else "int32", "_type": "Value"}
    return feats


def arrow_schema():
    import pyarrow as pa

    fields = [
        pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("id_str", pa.string()),
    ]
    fractions = set(schema.fraction_columns())
    for col in schema.label_columns():
        fields.append(pa.field(col, pa.float32() if col in fractions else pa.int32()))
    meta = {b"huggingface": json.dumps({"info": {"features": features_dict()}}, separators=(",", ":")).encode()}
    return pa.schema(fields, metadata=meta)


def to_table(rows: list[dict]):
    """Rows from :func:`make_galaxy` -> a pyarrow Table in dataset column order, fractions added."""
    import pyarrow as pa

    cols: dict = {"image": [r["image"] for r in rows], "id_str": [r["id_str"] for r in rows]}
    for q, answers in schema.QUESTIONS.items():
        total = np.array([r[schema.total_column(q)] for r in rows], np.int32)
        with np.errstate(invalid="ignore", divide="ignore"):
            for a in answers:
                counts = np.array([r[schema.count_column(q, a)] for r in rows], np.int32)
                cols[schema.count_column(q, a)] = counts
                frac = np.where(total > 0, counts / np.maximum(total, 1), np.nan).astype(np.float32)
                cols[schema.fraction_column(q, a)] = frac
        cols[schema.total_column(q)] = total
    sch = arrow_schema()
    return pa.table([pa.array(cols[f.name], type=f.type) for f in sch], schema=sch)


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.parquet"


def plan(cfg: Config) -> list[tuple[str, str, int, int]]:
    """Every file to write: (relative path, split, first index, stop index)."""
    files = []
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        if n == 0:
            continue
        k = math.ceil(n / cfg.shard_size)
        bounds = np.linspace(0, n, k + 1).round().astype(int)
        for i in range(k):
            files.append((f"data/{shard_name(split, i, k)}", split, int(bounds[i]), int(bounds[i + 1])))
        tiny = min(n, max(8, round(n * cfg.tiny_fraction)))
        files.append((f"tiny/{shard_name(split, 0, 1)}", split, 0, tiny))
    return files


def readme(cfg: Config) -> str:
    """The dataset card: YAML header declaring the ``default`` and ``tiny`` configs."""
    splits = [s for s, n in (("train", cfg.n_train), ("test", cfg.n_test)) if n > 0]
    lines = ["---", "configs:"]
    for name, folder in (("default", "data"), ("tiny", "tiny")):
        lines += [f"- config_name: {name}", *(["  default: true"] if name == "default" else []), "  data_files:"]
        for s in splits:
            lines += [f"  - split: {s}", f"    path: {folder}/{s}-*"]
    lines += ["dataset_info:", "  features:"]
    for name, feat in features_dict().items():
        lines += [f"  - name: {name}", f"    dtype: {'image' if feat['_type'] == 'Image' else feat['dtype']}"]
    lines += ["pretty_name: Synthetic Galaxy Zoo Euclid (galaxysae synth)", "tags:", "- synthetic", "---", ""]
    lines += [
        "# Synthetic gz_euclid",
        "",
        "**These are procedural galaxies, not Euclid data.** Written by `galaxysae synth` in the layout",
        "and schema of `mwalmsley/gz_euclid`, so that the atlas runs end to end offline.",
        "",
        f"- seed {cfg.seed}, {cfg.n_train} train + {cfg.n_test} test galaxies, "
        f"{cfg.image_size}x{cfg.image_size} px JPEG (quality {cfg.jpeg_quality})",
        "- vote counts come from simulated volunteers walking the Galaxy Zoo Euclid decision tree;",
        "  the answer probabilities follow each galaxy's generated morphology",
        "- `{question}_total-votes == 0` means the question was not asked; its fractions are NaN",
    ]
    if cfg.corrupt:
        ids = ", ".join(galaxy_id(cfg.seed, "train", i) for i in corrupt_indices(cfg))
        lines.append(f"- on purpose, these train galaxies have truncated (undecodable) JPEGs: {ids}")
    lines.append("")
    return "\n".join(lines)


def _check_existing(cfg: Config) -> None:
    """A rerun into the same folder must have the same generation settings (it then resumes)."""
    path = storage.join(cfg.out, "config.toml")
    if storage.exists(path):
        try:
            old = tomllib.loads(storage.read_bytes(path).decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a readable synth config ({exc}); delete it or choose another --out") from None
        new = config.to_dict(cfg)
        diff = [k for k in _GENERATION_KEYS if old.get(k) != new[k]]
        if diff:
            shown = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in diff)
            raise ValueError(
                f"{cfg.out} already holds a dataset generated with other settings ({shown}); "
                "choose another --out or delete it"
            )
    elif storage.listdir(storage.join(cfg.out, "data")):
        raise ValueError(f"{cfg.out}/data holds files not written by galaxysae synth; choose another --out")


def _workers(cfg: Config, n_rows: int) -> int:
    if n_rows < 64:
        return 1
    w = cfg.workers or min(8, os.cpu_count() or 1)
    return max(1, min(w, n_rows // 32))


def run(cfg: Config) -> dict:
    """Write the dataset under ``cfg.out``. Finished shards are kept; -> summary dict."""
    # run by `ray job submit`, a relative --out would land in Ray's temporary copy of the
    # working dir, which Ray deletes: refused there; resolved against the cwd elsewhere
    cfg = config.absolute_paths(cfg, outputs=("out",))
    _check_existing(cfg)
    storage.makedirs(cfg.out)
    config.save(cfg, cfg.out)
    t0 = time.perf_counter()
    todo = [f for f in plan(cfg) if not storage.exists(storage.join(cfg.out, f[0]))]
    n_rows = sum(stop - start for _, _, start, stop in todo)
    workers = _workers(cfg, n_rows)
    log.info("synth: %d files to write (%d galaxies, %d px) into %s with %d worker(s)",
             len(todo), n_rows, cfg.image_size, cfg.out, workers)

    bad = corrupt_indices(cfg)
    if bad:
        log.warning("synth: %d train galaxies get truncated JPEGs on purpose: %s", len(bad),
                    ", ".join(galaxy_id(cfg.seed, "train", i) for i in bad))

    def chunks(start: int, stop: int, split: str):
        step = max(8, math.ceil((stop - start) / (4 * workers)))
        corrupt = frozenset(bad) if split == "train" else frozenset()
        return [(cfg.seed, split, a, min(a + step, stop), cfg.image_size, cfg.jpeg_quality, corrupt)
                for a in range(start, stop, step)]

    pool = None
    if workers > 1:
        import multiprocessing as mp

        # spawn, not fork: the caller may hold threads (Ray, torch) that a fork would copy half-locked.
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    try:
        for rel, split, start, stop in todo:
            parts = chunks(start, stop, split)
            results = pool.map(_rows, parts) if pool else map(_rows, parts)
            rows = [r for part in results for r in part]
            storage.write_parquet(to_table(rows), storage.join(cfg.out, rel), row_group_size=100)
            log.info("synth: wrote %s (%d galaxies)", rel, len(rows))
    finally:
        if pool:
            pool.shutdown()
    storage.write_bytes(storage.join(cfg.out, "README.md"), readme(cfg).encode())
    elapsed = time.perf_counter() - t0
    log.info("synth: done in %.1f s: %s (procedural galaxies, not Euclid data)", elapsed, cfg.out)
    return {"out": cfg.out, "files": [f[0] for f in plan(cfg)], "written": len(todo), "seconds": elapsed,
            "corrupt_ids": [galaxy_id(cfg.seed, "train", i) for i in bad]}


__all__ = ["Config", "run", "make_galaxy", "corrupt_indices", "sample_params", "render", "answer_probs", "vote", "to_table",
           "arrow_schema", "features_dict", "galaxy_id", "galaxy_rng", "plan", "readme"]
