"""Procedural NEU-DET and Severstal look-alikes, written in the published file layouts.

The synthetic sets are the embedded default for the demo, the tests and the benchmarks: they exercise
the real loaders unchanged (Pascal VOC XML + 200x200 JPEGs; Kaggle ``train.csv`` RLE + 1600x256 JPEGs).

Determinism: every image draws from its own generator ``np.random.default_rng([seed, dataset, ...])``,
so the same seed gives byte-identical files, and a larger ``n`` only appends images.

Rendering: ``image = clip(round(background + sum(deltas)))``, where each defect instance contributes a
signed intensity change ``delta`` that is exactly zero wherever its magnitude would be below
:data:`MIN_DELTA` gray levels. An instance's mask is where its delta is non-zero (Severstal clusters of
spots or lines are annotated by a closed region around them, as in the competition's masks), and its
box is the tight box of that mask. NEU texture: rolling streaks along the vertical axis as in the real
NEU images, fine grain, mild illumination gradient. Severstal texture: darker, broad vertical
banding, coarse speckle with bright specks, sometimes the dark unimaged area beside the strip edge.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from ..data.rle import SEVERSTAL_SHAPE, rle_encode

# The class tuples equal those of .neu and .severstal (a test checks it); they are not imported from there
# so that generating data does not import Detectron2 and torch.
NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
NEU_FOLDERS = ("cr", "in", "pa", "ps", "rs", "sc")  # the <folder> of the published XMLs, per class
NEU_SIZE = 200
SEVERSTAL_CLASSES = ("defect_1", "defect_2", "defect_3", "defect_4")  # ClassId 1..4
JPEG_QUALITY = 92
MIN_DELTA = 3.0  # gray levels: smaller changes are zeroed, so a defect's mask is exactly its footprint
MIXED_FRACTION = 0.05  # NEU images that also hold one instance of another class (as in the real set)
SEVERSTAL_SECOND_CLASS = 0.3  # defect images holding a second class
_NEU, _SEVERSTAL, _CSV_ONLY = 0, 1, 2  # dataset index in the per-image seeds

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class SyntheticDefect:
    """One annotated defect: its label and its boolean mask over the whole image."""

    label: str
    mask: np.ndarray

    def voc_box(self) -> tuple[int, int, int, int]:
        """Tight box of the mask as 1-based inclusive ``(xmin, ymin, xmax, ymax)``."""
        return mask_voc_box(self.mask)


@dataclass
class SyntheticImage:
    """A rendered grayscale image, the same image without defects, and its defects."""

    image: np.ndarray  # uint8 (H, W)
    background: np.ndarray  # uint8 (H, W)
    defects: list[SyntheticDefect] = field(default_factory=list)


def mask_voc_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """1-based inclusive ``(xmin, ymin, xmax, ymax)`` of a non-empty boolean mask (Pascal VOC)."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if len(cols) == 0:
        raise ValueError("empty mask has no box")
    return int(cols[0]) + 1, int(rows[0]) + 1, int(cols[-1]) + 1, int(rows[-1]) + 1


# ----------------------------------------------------------------------------- noise and shapes

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std noise of ``shape`` that varies over about ``cell`` = (dy, dx) pixels."""
    h, w = shape
    gh, gw = max(2, math.ceil(h / cell[0]) + 1), max(2, math.ceil(w / cell[1]) + 1)
    big = cv2.resize(rng.standard_normal((gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return (big - big.mean()) / (big.std() + 1e-6)


def _blob(rng: np.random.Generator, ry: float, rx: float, angle: float, rough: float,
          cell: tuple[float, float], soft: float = 0.15) -> np.ndarray:
    """Irregular ellipse-like alpha in [0, 1] (radii ``ry``, ``rx``, rotated by ``angle`` radians).

    ``rough`` scales the smooth noise that perturbs the outline; ``soft`` is the width of the fading
    edge as a fraction of the radius.
    """
    c, s = math.cos(angle), math.sin(angle)
    grow = 1 + 2 * rough
    ex = int(math.ceil(math.hypot(rx * c, ry * s) * grow + 3))  # half extents of the rotated ellipse
    ey = int(math.ceil(math.hypot(rx * s, ry * c) * grow + 3))
    yy, xx = np.mgrid[-ey:ey + 1, -ex:ex + 1].astype(np.float32)
    u, v = c * xx + s * yy, -s * xx + c * yy
    dist = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    field_ = dist + rough * _smooth_noise(rng, dist.shape, cell)
    return np.clip((1.0 - field_) / soft, 0.0, 1.0)


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, step: float,
          turn: float) -> np.ndarray:
    """Points of a random walk (``steps`` segments, direction changing by N(0, ``turn``) per step)."""
    angles = angle + np.cumsum(rng.normal(0.0, turn, steps))
    moves = step * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.vstack([start, start + np.cumsum(moves, axis=0)])


def _draw_lines(canvas: np.ndarray, lines: list[np.ndarray], values: list[float], thickness: list[int]) -> None:
    """Anti-aliased polylines (x, y points, sub-pixel) on a uint8 canvas, max-combined."""
    for pts, val, th in zip(lines, values, thickness):
        layer = np.zeros_like(canvas)
        cv2.polylines(layer, [np.round(pts * 4).astype(np.int32)], False, int(round(255 * val)), th,
                      cv2.LINE_AA, shift=2)
        np.maximum(canvas, layer, out=canvas)


def _zero_small(delta: np.ndarray) -> np.ndarray:
    """The delta with changes below :data:`MIN_DELTA` gray levels set to exactly zero."""
    delta = delta.astype(np.float32)
    delta[np.abs(delta) < MIN_DELTA] = 0.0
    return delta


def _drop_small(delta: np.ndarray, min_area: int, relative: float = 0.0) -> np.ndarray:
    """The delta with its 8-connected pieces below ``min_area`` pixels, or below ``relative`` times the
    largest piece, set to zero."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats((delta != 0).astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if len(areas) == 0:
        return delta
    small = 1 + np.flatnonzero(areas < max(min_area, relative * areas.max()))
    if len(small):
        delta = delta.copy()
        delta[np.isin(labels, small)] = 0.0
    return delta


@dataclass
class _Patch:
    """A defect instance drawn on a local canvas: its delta and (optionally) its annotated region."""

    delta: np.ndarray
    region: np.ndarray | None = None  # bool, same shape; default: where delta != 0

    def mask(self) -> np.ndarray:
        return self.delta != 0 if self.region is None else self.region


# ----------------------------------------------------------------------------- NEU defect shapes
# Each takes the generator and a per-image contrast factor and returns a _Patch. The rolling
# direction is vertical (image y), as in the published NEU images.

def _neu_crazing(rng: np.random.Generator, contrast: float) -> _Patch:
    """Fine dark crack network: branching, wavy 1-px random walks over a large area."""
    h, w = int(rng.uniform(50, 180)), int(rng.uniform(50, 180))
    canvas = np.zeros((h, w), np.uint8)
    lines, values = [], []
    for _ in range(max(6, int(h * w / rng.uniform(250, 450)))):
        start = rng.uniform([0, 0], [w, h])
        walk = _walk(rng, start, rng.uniform(-0.6, 0.6) + rng.choice([0, math.pi]),
                     int(rng.integers(5, 16)), 2.0, 0.35)
        lines.append(walk)
        values.append(rng.uniform(0.6, 1.0))
        if rng.random() < 0.5:  # a branch
            k = int(rng.integers(1, len(walk)))
            lines.append(_walk(rng, walk[k], rng.uniform(0, 2 * math.pi), int(rng.integers(3, 9)), 2.0, 0.4))
            values.append(rng.uniform(0.5, 0.9))
    _draw_lines(canvas, lines, values, [1] * len(lines))
    alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), 0.5)
    return _Patch(_zero_small(-rng.uniform(50, 75) * contrast * alpha))


def _neu_inclusion(rng: np.random.Generator, contrast: float) -> _Patch:
    """A vertical chain of 1-4 dark spots elongated along the rolling direction."""
    spots = []
    for _ in range(int(rng.integers(1, 5))):
        ry, rx = rng.uniform(6, 18), rng.uniform(2.5, 6)
        spots.append((_blob(rng, ry, rx, rng.normal(0, 0.08), 0.2, (6, 6), soft=0.5), ry))
    height = int(sum(2 * ry + 4 for _, ry in spots)) + 40
    width = max(a.shape[1] for a, _ in spots) + 14
    canvas = np.zeros((height, width), np.float32)
    y = 20.0
    for alpha, ry in spots:
        cy, cx = int(y + ry), width // 2 + int(rng.integers(-3, 4))
        _add(canvas, alpha * rng.uniform(0.7, 1.0), cy, cx)
        y += 2 * ry + rng.uniform(1, 8)
    return _Patch(_zero_small(-rng.uniform(45, 70) * contrast * np.sqrt(canvas)))


def _neu_patches(rng: np.random.Generator, contrast: float) -> _Patch:
    """A large smooth irregular area, mostly darker, with a soft edge and mottled inside."""
    alpha = _blob(rng, rng.uniform(18, 55), rng.uniform(18, 55), rng.uniform(0, math.pi), 0.35, (14, 14), 0.3)
    mottle = 1 + 0.15 * _smooth_noise(rng, alpha.shape, (6, 6))
    sign = -1.0 if rng.random() < 0.75 else 1.0
    return _Patch(_drop_small(_zero_small(sign * rng.uniform(40, 65) * contrast * alpha * mottle), 12, 0.05))


def _neu_pitted(rng: np.random.Generator, contrast: float) -> _Patch:
    """A cluster of many small round dark pits."""
    ry, rx = rng.uniform(15, 45), rng.uniform(15, 45)
    n = int(rng.uniform(0.025, 0.05) * math.pi * ry * rx)
    h, w = int(2 * ry) + 8, int(2 * rx) + 8
    canvas = np.zeros((h, w), np.uint8)
    for _ in range(max(n, 8)):
        rad, ang = math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        x, y = w / 2 + rad * rx * math.cos(ang), h / 2 + rad * ry * math.sin(ang)
        cv2.circle(canvas, (round(x * 4), round(y * 4)), round(rng.uniform(0.8, 2.2) * 4),
                   int(rng.uniform(150, 255)), -1, cv2.LINE_AA, shift=2)
    alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), 0.5)
    return _Patch(_zero_small(-rng.uniform(45, 70) * contrast * alpha))


def _neu_rolled_in_scale(rng: np.random.Generator, contrast: float) -> _Patch:
    """Scattered angular flakes, dark and some bright, over a faint dark haze."""
    ry, rx = rng.uniform(15, 40), rng.uniform(25, 60)
    haze = _blob(rng, ry, rx, rng.normal(0, 0.2), 0.3, (10, 10), 0.4)
    h, w = haze.shape
    dark, bright = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    for _ in range(int(rng.uniform(0.006, 0.012) * math.pi * ry * rx) + 6):
        rad, ang = math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        cx, cy = w / 2 + rad * rx * math.cos(ang), h / 2 + rad * ry * math.sin(ang)
        k = int(rng.integers(4, 8))
        theta = np.sort(rng.uniform(0, 2 * math.pi, k))
        size, elong, tilt = rng.uniform(2, 6), rng.uniform(1.0, 2.2), rng.normal(0, 0.5)
        px, py = size * elong * np.cos(theta), size * np.sin(theta) * rng.uniform(0.6, 1.0, k)
        pts = np.stack([cx + px * math.cos(tilt) - py * math.sin(tilt),
                        cy + px * math.sin(tilt) + py * math.cos(tilt)], axis=1)
        target = bright if rng.random() < 0.25 else dark
        cv2.fillPoly(target, [np.round(pts * 4).astype(np.int32)], int(rng.uniform(160, 255)), cv2.LINE_AA, shift=2)
    amp = rng.uniform(40, 60) * contrast
    delta = amp * (-dark.astype(np.float32) / 255 + 0.8 * bright.astype(np.float32) / 255 - 0.25 * haze)
    return _Patch(_zero_small(cv2.GaussianBlur(delta, (0, 0), 0.5)))


def _neu_scratches(rng: np.random.Generator, contrast: float) -> _Patch:
    """A long thin, straight or slightly curved line, mostly bright, mostly along the rolling direction."""
    length = rng.uniform(60, 190)
    ang = math.pi / 2 + (rng.normal(0, 0.2) if rng.random() < 0.8 else rng.uniform(-1.2, 1.2))
    d = np.array([math.cos(ang), math.sin(ang)])
    bend = rng.uniform(-0.08, 0.08) * length
    t = np.linspace(0, 1, 40)[:, None]
    pts = t * length * d + (4 * t * (1 - t)) * bend * np.array([-d[1], d[0]])
    pts -= pts.min(axis=0) - 6
    h, w = (np.ceil(pts.max(axis=0)) + 7).astype(int)[::-1]
    canvas = np.zeros((h, w), np.uint8)
    _draw_lines(canvas, [pts], [1.0], [int(rng.choice([1, 1, 2, 3]))])
    along = np.clip(0.75 + 0.35 * _smooth_noise(rng, (h, w), (25, 25)), 0.3, 1.0)
    sign = 1.0 if rng.random() < 0.75 else -1.0
    return _Patch(_zero_small(sign * rng.uniform(50, 85) * contrast * along * canvas.astype(np.float32) / 255))


_NEU_SHAPES: tuple[Callable[[np.random.Generator, float], _Patch], ...] = (
    _neu_crazing, _neu_inclusion, _neu_patches, _neu_pitted, _neu_rolled_in_scale, _neu_scratches)
_NEU_COUNT_WEIGHTS = ((0.6, 0.3, 0.1), (0.3, 0.4, 0.3), (0.4, 0.4, 0.2),
                      (0.6, 0.3, 0.1), (0.4, 0.4, 0.2), (0.4, 0.35, 0.25))  # P(1, 2, 3 instances)


# ----------------------------------------------------------------------------- composition

def _add(canvas: np.ndarray, patch: np.ndarray, cy: int, cx: int) -> np.ndarray:
    """Add ``patch`` centred at (cy, cx), clipped to the canvas; returns the full-size footprint."""
    ph, pw = patch.shape
    y0, x0 = cy - ph // 2, cx - pw // 2
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(canvas.shape[0], y0 + ph), min(canvas.shape[1], x0 + pw)
    footprint = np.zeros(canvas.shape, bool)
    if ye > ys and xe > xs:
        canvas[ys:ye, xs:xe] += patch[ys - y0:ye - y0, xs - x0:xe - x0]
        footprint[ys:ye, xs:xe] = True
    return footprint


def _paste_mask(shape: tuple[int, int], patch: np.ndarray, cy: int, cx: int) -> np.ndarray:
    """The boolean ``patch`` placed centred at (cy, cx) in an empty mask of ``shape``."""
    out = np.zeros(shape, np.float32)
    _add(out, patch.astype(np.float32), cy, cx)
    return out > 0


def _box_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = 0) -> float:
    """Intersection area of two inclusive boxes (b grown by ``margin``) over the smaller box's area."""
    iw = min(a[2], b[2] + margin) - max(a[0], b[0] - margin) + 1
    ih = min(a[3], b[3] + margin) - max(a[1], b[1] - margin) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    area = min((a[2] - a[0] + 1) * (a[3] - a[1] + 1), (b[2] - b[0] + 1) * (b[3] - b[1] + 1))
    return iw * ih / area


def _place(rng: np.random.Generator, delta: np.ndarray, patch: _Patch, boxes: list, x_range: tuple[int, int],
           max_overlap: float, margin: int = 0, min_area: int = 12, min_piece: int = 0,
           tries: int = 30) -> np.ndarray | None:
    """Place ``patch`` at a random spot whose box overlaps earlier ``boxes`` at most ``max_overlap``.

    Patches may spill a little over the image border (and are cut at ``x_range``); pieces of the cut
    mask under ``min_piece`` pixels are removed with their delta. On success adds the delta, appends
    the box and returns the full-size mask; returns None when no spot is found.
    """
    h = delta.shape[0]
    ph, pw = patch.delta.shape
    lo, hi = x_range
    for _ in range(tries):
        cy = int(rng.uniform(min(0.3 * ph, h / 2), h - min(0.3 * ph, h / 2)))
        cx = int(rng.uniform(lo + min(0.3 * pw, (hi - lo) / 2), hi - min(0.3 * pw, (hi - lo) / 2)))
        mask = _paste_mask(delta.shape, patch.mask(), cy, cx)
        mask[:, :lo] = False
        mask[:, hi:] = False
        if min_piece:
            mask = _drop_small(mask.astype(np.float32), min_piece) != 0
        if mask.sum() < min_area:
            continue
        box = mask_voc_box(mask)
        if all(_box_overlap(box, b, margin) <= max_overlap for b in boxes):
            piece = np.zeros(delta.shape, np.float32)
            _add(piece, patch.delta, cy, cx)
            piece[~mask] = 0.0
            delta += piece
            boxes.append(box)
            return mask
    return None


def _finish(background: np.ndarray, delta: np.ndarray, defects: list[SyntheticDefect]) -> SyntheticImage:
    """Round and clip the background and the defect-bearing image to uint8."""
    def to_u8(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return SyntheticImage(to_u8(background + delta), to_u8(background), defects)


# ----------------------------------------------------------------------------- NEU

def _neu_background(rng: np.random.Generator) -> np.ndarray:
    """Rolled-steel texture: vertical rolling streaks, fine grain, mottling and an illumination ramp."""
    shape = (NEU_SIZE, NEU_SIZE)
    yy, xx = np.mgrid[0:NEU_SIZE, 0:NEU_SIZE].astype(np.float32) / (NEU_SIZE - 1) - 0.5
    theta = rng.uniform(0, 2 * math.pi)
    grain = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), 0.6)
    return (rng.uniform(95, 165)
            + rng.uniform(3, 7) * _smooth_noise(rng, shape, (rng.uniform(25, 60), rng.uniform(1.5, 3)))
            + rng.uniform(2, 6) * _smooth_noise(rng, shape, (40, 40))
            + rng.uniform(0, 25) * (math.cos(theta) * xx + math.sin(theta) * yy)
            + rng.uniform(4, 8) * grain).astype(np.float32)


def render_neu_image(seed: int, class_index: int, number: int) -> SyntheticImage:
    """Render NEU image ``<NEU_CLASSES[class_index]>_<number>`` of the synthetic set for ``seed``.

    1-3 instances of the named class (more overlap allowed for large defect types), and with
    probability :data:`MIXED_FRACTION` one extra instance of another class.
    """
    bg_rng = np.random.default_rng([seed, _NEU, class_index, number, 0])
    rng = np.random.default_rng([seed, _NEU, class_index, number, 1])
    background = _neu_background(bg_rng)
    contrast = rng.uniform(0.8, 1.25)
    labels = [class_index] * int(rng.choice([1, 2, 3], p=_NEU_COUNT_WEIGHTS[class_index]))
    if rng.random() < MIXED_FRACTION:
        labels.append(int((class_index + rng.integers(1, len(NEU_CLASSES))) % len(NEU_CLASSES)))
    delta = np.zeros(background.shape, np.float32)
    boxes: list = []
    defects = []
    for label in labels:
        for _ in range(10):  # a new shape when one finds no room
            mask = _place(rng, delta, _NEU_SHAPES[label](rng, contrast), boxes, (0, NEU_SIZE), max_overlap=0.3)
            if mask is not None:
                defects.append(SyntheticDefect(NEU_CLASSES[label], mask))
                break
    return _finish(background, delta, defects)


def neu_voc_xml(class_index: int, number: int, defects: list[SyntheticDefect]) -> str:
    """The Pascal VOC annotation of one NEU image, formatted like the published files."""
    objects = "".join(
        "\t<object>\n"
        f"\t\t<name>{d.label}</name>\n"
        "\t\t<pose>Unspecified</pose>\n"
        "\t\t<truncated>0</truncated>\n"
        "\t\t<difficult>0</difficult>\n"
        "\t\t<bndbox>\n"
        + "".join(f"\t\t\t<{k}>{v}</{k}>\n" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), d.voc_box()))
        + "\t\t</bndbox>\n"
        "\t</object>\n" for d in defects)
    return ("<annotation>\n"
            f"\t<folder>{NEU_FOLDERS[class_index]}</folder>\n"
            f"\t<filename>{NEU_CLASSES[class_index]}_{number}.jpg</filename>\n"
            "\t<source>\n\t\t<database>NEU-DET</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{NEU_SIZE}</width>\n\t\t<height>{NEU_SIZE}</height>\n"
            "\t\t<depth>1</depth>\n\t</size>\n"
            "\t<segmented>0</segmented>\n"
            f"{objects}</annotation>\n")


def _save_jpeg(gray: np.ndarray, path: Path) -> None:
    """Save as baseline JPEG with 3 identical channels, like the published images."""
    Image.fromarray(gray, "L").convert("RGB").save(path, "JPEG", quality=JPEG_QUALITY)


def make_neu_synthetic(out_dir: str | os.PathLike, n_per_class: int = 50, seed: int = 0,
                       progress: Progress | None = None) -> Path:
    """Write a synthetic NEU-DET: ``IMAGES/<class>_<n>.jpg`` and ``ANNOTATIONS/<class>_<n>.xml``.

    n = 1..``n_per_class`` for each of :data:`NEU_CLASSES`. Files of the same names are overwritten.
    ``progress(done, total)`` is called after each image.
    """
    out = Path(out_dir)
    (out / "IMAGES").mkdir(parents=True, exist_ok=True)
    (out / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
    for ci, name in enumerate(NEU_CLASSES):
        for n in range(1, n_per_class + 1):
            sample = render_neu_image(seed, ci, n)
            _save_jpeg(sample.image, out / "IMAGES" / f"{name}_{n}.jpg")
            (out / "ANNOTATIONS" / f"{name}_{n}.xml").write_bytes(neu_voc_xml(ci, n, sample.defects).encode())
            if progress:
                progress(ci * n_per_class + n, len(NEU_CLASSES) * n_per_class)
    return out


# ----------------------------------------------------------------------------- Severstal

def _close_region(support: np.ndarray, grow: int) -> np.ndarray:
    """A solid region around a sparse support: dilate by ``grow`` px, close the gaps, fill holes."""
    pad = 2 * grow + 2
    m = cv2.copyMakeBorder(support.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2))
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (4 * grow + 1,) * 2))
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(m)
    cv2.drawContours(filled, contours, -1, 1, -1)
    return filled[pad:-pad, pad:-pad] > 0


def _sev_spots(rng: np.random.Generator, contrast: float) -> _Patch:
    """defect_1: a tight cluster of small spots (bright or dark), annotated by the region around them."""
    sy, sx = rng.uniform(5, 14), rng.uniform(6, 20)
    h, w = int(4 * sy) + 12, int(4 * sx) + 12
    canvas = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(6, 18))):
        y, x = np.clip(rng.normal([h / 2, w / 2], [sy, sx]), 4, [h - 5, w - 5])
        cv2.circle(canvas, (round(x * 4), round(y * 4)), round(rng.uniform(1.5, 4.0) * 4),
                   int(rng.uniform(170, 255)), -1, cv2.LINE_AA, shift=2)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    delta = _zero_small(sign * rng.uniform(45, 70) * contrast * canvas.astype(np.float32) / 255)
    return _Patch(delta, _close_region(delta != 0, 6))


def _sev_vertical_lines(rng: np.random.Generator, contrast: float) -> _Patch:
    """defect_2: a few short, nearly vertical lines side by side, annotated by their region."""
    k = int(rng.integers(1, 5))
    xs = np.cumsum(rng.uniform(4, 15, k))
    lines = []
    for x in xs:
        length, y0 = rng.uniform(25, 80), rng.uniform(0, 20)
        end = np.array([x + rng.normal(0, 2), y0 + length])
        lines.append(np.stack([np.array([x, y0]), end]) + 8)
    h, w = int(max(p[:, 1].max() for p in lines)) + 9, int(max(p[:, 0].max() for p in lines)) + 9
    canvas = np.zeros((h, w), np.uint8)
    _draw_lines(canvas, lines, list(rng.uniform(0.7, 1.0, k)), list(rng.integers(1, 4, k)))
    sign = -1.0 if rng.random() < 0.7 else 1.0
    delta = _zero_small(sign * rng.uniform(45, 65) * contrast * canvas.astype(np.float32) / 255)
    return _Patch(delta, _close_region(delta != 0, 3))


def _sev_band(rng: np.random.Generator, contrast: float) -> _Patch:
    """defect_3: a long horizontal scratch band with ragged edges, or an irregular streaky area."""
    if rng.random() < 0.6:
        alpha = _blob(rng, rng.uniform(3, 12), rng.uniform(80, 400), rng.normal(0, 0.02), 0.3, (4, 40), 0.3)
    else:
        alpha = _blob(rng, rng.uniform(15, 50), rng.uniform(40, 150), rng.normal(0, 0.1), 0.45, (12, 25), 0.25)
    streaks = np.clip(1 + 0.3 * _smooth_noise(rng, alpha.shape, (2, 30)), 0.3, 1.5)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return _Patch(_drop_small(_zero_small(sign * rng.uniform(35, 55) * contrast * alpha * streaks), 40, 0.05))


def _sev_blotch(rng: np.random.Generator, contrast: float) -> _Patch:
    """defect_4: a large dark irregular blotch with a soft edge and mottled inside."""
    alpha = _blob(rng, rng.uniform(30, 100), rng.uniform(50, 220), rng.normal(0, 0.2), 0.4, (30, 30), 0.3)
    mottle = 1 + 0.2 * _smooth_noise(rng, alpha.shape, (8, 8))
    return _Patch(_drop_small(_zero_small(-rng.uniform(40, 65) * contrast * alpha * mottle), 40, 0.05))


_SEV_SHAPES: tuple[Callable[[np.random.Generator, float], _Patch], ...] = (
    _sev_spots, _sev_vertical_lines, _sev_band, _sev_blotch)
_SEV_MAX_INSTANCES = (3, 3, 2, 2)


def _severstal_background(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """Strip texture (darker than NEU, broad vertical banding, coarse speckle, bright specks).

    In some images one end shows the dark unimaged area beside the strip edge; returns the texture
    and the x range holding steel.
    """
    h, w = SEVERSTAL_SHAPE
    grain = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 1.1)
    grain /= grain.std()
    specks = cv2.GaussianBlur((rng.random((h, w)) < 0.004).astype(np.float32), (0, 0), 0.7)
    img = (rng.uniform(65, 110)
           + rng.uniform(5, 10) * _smooth_noise(rng, (h, w), (4 * h, rng.uniform(15, 60)))
           + rng.uniform(1, 3) * _smooth_noise(rng, (h, w), (80, 2))
           + rng.uniform(5, 9) * grain
           + rng.uniform(60, 150) * specks
           + rng.uniform(-10, 10) * np.linspace(-1, 1, w, dtype=np.float32)[None, :])
    x_range = (0, w)
    if rng.random() < 0.15:
        edge = int(rng.uniform(80, 450))
        x = np.arange(w, dtype=np.float32)
        x_range = (edge, w) if rng.random() < 0.5 else (0, w - edge)
        dist = x - edge if x_range[0] else (w - edge) - x  # > 0 on the steel
        steel = np.clip(dist / 3.0 + 0.5, 0, 1)[None, :]
        img = steel * img + (1 - steel) * (rng.uniform(3, 15) + 2 * grain)
    return img.astype(np.float32), x_range


def severstal_image_ids(seed: int, n_images: int, namespace: int = _SEVERSTAL) -> list[str]:
    """Distinct 9-hex-character image ids (``<id>.jpg``) derived from seed, namespace and index."""
    ids, seen = [], set()
    for i in range(n_images):
        salt = 0
        while True:
            key = f"steel_fsd.synthetic/{namespace}/{seed}/{i}/{salt}".encode()
            name = hashlib.sha256(key).hexdigest()[:9] + ".jpg"
            if name not in seen:
                break
            salt += 1
        seen.add(name)
        ids.append(name)
    return ids


def severstal_plan(seed: int, n_images: int, negative_fraction: float = 0.2) -> list[tuple[str, tuple[int, ...]]]:
    """(ImageId, ClassIds present) per image.

    Exactly ``round(negative_fraction * n_images)`` images are defect-free; the defect images cycle
    through the four classes as their main class (so every class appears once there are 4 of them),
    and :data:`SEVERSTAL_SECOND_CLASS` of them hold a second class.
    """
    if not 0 <= negative_fraction <= 1:
        raise ValueError(f"negative_fraction must be in [0, 1], got {negative_fraction}")
    rng = np.random.default_rng([seed, _SEVERSTAL, n_images])
    negatives = set(rng.permutation(n_images)[:round(negative_fraction * n_images)].tolist())
    plan, k = [], 0
    for i, image_id in enumerate(severstal_image_ids(seed, n_images)):
        classes: tuple[int, ...] = ()
        if i not in negatives:
            main = k % 4 + 1
            k += 1
            classes = (main,)
            if rng.random() < SEVERSTAL_SECOND_CLASS:
                classes = tuple(sorted({main, int((main + rng.integers(0, 3)) % 4 + 1)}))
        plan.append((image_id, classes))
    return plan


def render_severstal_image(seed: int, index: int, class_ids: tuple[int, ...]) -> SyntheticImage:
    """Render Severstal image ``index`` holding the given ClassIds (1..4): one mask per class.

    Instances never overlap (their boxes are kept 8 px apart), so the class masks are disjoint.
    """
    bg_rng = np.random.default_rng([seed, _SEVERSTAL, index, 0])
    rng = np.random.default_rng([seed, _SEVERSTAL, index, 1])
    background, x_range = _severstal_background(bg_rng)
    contrast = rng.uniform(0.85, 1.2)
    delta = np.zeros(background.shape, np.float32)
    boxes: list = []
    defects = []
    for cid in class_ids:
        union = np.zeros(background.shape, bool)
        n = int(rng.integers(1, _SEV_MAX_INSTANCES[cid - 1] + 1))
        placed = 0
        for attempt in range(n + 10):  # a new shape when one finds no room; at least one instance
            if placed == n or (placed and attempt >= n):
                break
            mask = _place(rng, delta, _SEV_SHAPES[cid - 1](rng, contrast), boxes, x_range,
                          max_overlap=0.0, margin=8, min_area=40, min_piece=40)
            if mask is not None:
                union |= mask
                placed += 1
        if placed:
            defects.append(SyntheticDefect(SEVERSTAL_CLASSES[cid - 1], union))
    return _finish(background, delta, defects)


def _write_severstal_csv(path: Path, rows: list[tuple[str, int, str]], ids: list[str], header: str) -> None:
    """Write (ImageId, ClassId, rle) rows with the ``v1`` (4 rows per image) or ``v2`` header."""
    if header not in ("v1", "v2"):
        raise ValueError(f"header must be 'v1' or 'v2', got {header!r}")
    by_key = {(i, c): r for i, c, r in rows}
    if header == "v1":
        lines = ["ImageId_ClassId,EncodedPixels"] + [
            f"{i}_{c},{by_key.get((i, c), '')}" for i in sorted(ids) for c in range(1, 5)]
    else:
        lines = ["ImageId,ClassId,EncodedPixels"] + [f"{i},{c},{r}" for (i, c), r in sorted(by_key.items())]
    path.write_bytes(("\n".join(lines) + "\n").encode())


def make_severstal_synthetic(out_dir: str | os.PathLike, n_images: int = 120, seed: int = 0,
                             negative_fraction: float = 0.2, header: str = "v1",
                             progress: Progress | None = None) -> Path:
    """Write a synthetic Severstal set: ``train_images/<id>.jpg`` (1600x256) and ``train.csv``.

    ``header="v1"``: the original ``ImageId_ClassId,EncodedPixels`` with 4 rows per image (empty when
    absent); ``"v2"``: ``ImageId,ClassId,EncodedPixels`` with the non-empty rows only.
    ``progress(done, total)`` is called after each image.
    """
    if header not in ("v1", "v2"):
        raise ValueError(f"header must be 'v1' or 'v2', got {header!r}")
    out = Path(out_dir)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    plan = severstal_plan(seed, n_images, negative_fraction)
    rows = []
    for index, (image_id, class_ids) in enumerate(plan):
        sample = render_severstal_image(seed, index, class_ids)
        _save_jpeg(sample.image, out / "train_images" / image_id)
        rows += [(image_id, SEVERSTAL_CLASSES.index(d.label) + 1, rle_encode(d.mask)) for d in sample.defects]
        if progress:
            progress(index + 1, n_images)
    _write_severstal_csv(out / "train.csv", rows, [i for i, _ in plan], header)
    return out


def _ellipses_rle(rng: np.random.Generator, shape: tuple[int, int] = SEVERSTAL_SHAPE) -> str:
    """RLE of 1-2 random ellipses in disjoint column ranges, built directly from per-column runs.

    Rows stop short of the last one so runs of adjacent columns never touch: the string is the same
    as :func:`rle_encode` of the decoded mask would give.
    """
    h, w = shape
    starts, lengths, x_end = [], [], -1.0
    for _ in range(int(rng.integers(1, 3))):
        rx, ry = rng.uniform(5, 120), rng.uniform(5, 100)
        cx, cy = rng.uniform(max(x_end + rx + 1, 0), max(x_end + rx + 2, w)), rng.uniform(0, h)
        cols = np.arange(max(0, math.ceil(cx - rx)), min(w, math.floor(cx + rx) + 1))
        if len(cols) == 0:
            continue
        half = ry * np.sqrt(np.clip(1 - ((cols - cx) / rx) ** 2, 0, 1))
        y0 = np.clip(np.ceil(cy - half), 0, h - 1).astype(np.int64)
        y1 = np.clip(np.floor(cy + half) + 1, 0, h - 1).astype(np.int64)
        keep = y1 > y0
        starts.append(cols[keep] * h + y0[keep] + 1)
        lengths.append((y1 - y0)[keep])
        x_end = cx + rx
    if not starts or sum(len(s) for s in starts) == 0:
        return f"{int(rng.integers(0, w)) * h + 1} {int(rng.integers(1, h))}"
    runs = np.stack([np.concatenate(starts), np.concatenate(lengths)], axis=1)
    return " ".join(map(str, runs.ravel().tolist()))


def make_severstal_csv_only(out_csv: str | os.PathLike, n_images: int, n_masks: int, seed: int = 0,
                            image_dir: str | os.PathLike | None = None, header: str = "v1") -> Path:
    """Write a Severstal-style CSV of ``n_images`` ids with ``min(n_masks, 4 * n_images)`` random masks.

    No images are rendered. With ``image_dir``, every ``<id>.jpg`` is created there as a hard link to one
    uniform 1600x256 placeholder JPEG, so loaders' existence and size checks pass cheaply.
    """
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = severstal_image_ids(seed, n_images, namespace=_CSV_ONLY)
    rng = np.random.default_rng([seed, _CSV_ONLY, n_images, n_masks])
    slots = rng.choice(4 * n_images, size=min(n_masks, 4 * n_images), replace=False)
    rows = [(ids[s // 4], int(s % 4) + 1, _ellipses_rle(rng)) for s in sorted(slots.tolist())]
    _write_severstal_csv(out, rows, ids, header)
    if image_dir is not None and ids:
        folder = Path(image_dir)
        folder.mkdir(parents=True, exist_ok=True)
        first = folder / ids[0]
        first.unlink(missing_ok=True)
        _save_jpeg(np.full(SEVERSTAL_SHAPE, 100, np.uint8), first)
        for image_id in ids[1:]:
            (folder / image_id).unlink(missing_ok=True)
            os.link(first, folder / image_id)
    return out
