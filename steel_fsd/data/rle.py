"""Kaggle/Severstal run-length encoding: 1-indexed starts, column-major, and mask -> boxes."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import pycocotools.mask as mask_util

SEVERSTAL_SHAPE = (256, 1600)  # (height, width)


class RLEError(ValueError):
    """Malformed run-length encoding (the message names the cause)."""


def parse_rle(rle: str, shape: tuple[int, int] = SEVERSTAL_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``"start length ..."`` into 0-based ``starts`` and ``lengths``, validating them.

    Raises RLEError for an odd token count, non-integers, non-positive lengths, a run starting or
    ending beyond the image, and overlapping or unsorted runs.
    """
    tokens = rle.split()
    if len(tokens) % 2:
        raise RLEError(f"odd number of tokens ({len(tokens)}): RLE must be 'start length' pairs")
    try:
        nums = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    except ValueError:
        raise RLEError("non-integer token in RLE") from None
    starts, lengths = nums[:, 0] - 1, nums[:, 1]
    n = shape[0] * shape[1]
    if len(starts) == 0:
        return starts, lengths
    if (starts < 0).any():
        raise RLEError(f"start {int(starts.min()) + 1} < 1 (starts are 1-indexed)")
    if (lengths <= 0).any():
        raise RLEError(f"run length {int(lengths.min())} <= 0")
    ends = starts + lengths
    if (starts >= n).any():
        raise RLEError(f"start {int(starts.max()) + 1} beyond the image ({shape[0]}x{shape[1]} = {n} pixels)")
    if (ends > n).any():
        i = int(np.argmax(ends > n))
        raise RLEError(f"run {int(starts[i]) + 1}+{int(lengths[i])} ends beyond the image ({n} pixels)")
    if (starts[1:] < ends[:-1]).any():
        i = int(np.argmax(starts[1:] < ends[:-1]))
        raise RLEError(
            f"overlapping or unsorted runs: {int(starts[i]) + 1}+{int(lengths[i])} and "
            f"{int(starts[i + 1]) + 1}+{int(lengths[i + 1])}")
    return starts, lengths


def to_coco_rle(rle: str, shape: tuple[int, int] = SEVERSTAL_SHAPE) -> dict:
    """The Kaggle RLE as a COCO RLE (pycocotools' compressed form). Both number pixels column-major; COCO
    counts alternate background and foreground run lengths, starting with background."""
    starts, lengths = parse_rle(rle, shape)
    h, w = shape
    gaps = starts - np.concatenate([[0], (starts + lengths)[:-1]])  # background before each run
    counts = np.stack([gaps, lengths], 1).reshape(-1).tolist()
    return mask_util.frPyObjects({"counts": counts + [h * w - sum(counts)], "size": [h, w]}, h, w)


def rle_decode(rle: str, shape: tuple[int, int] = SEVERSTAL_SHAPE) -> np.ndarray:
    """Decode to a boolean mask of ``shape`` (H, W), through pycocotools."""
    coco = to_coco_rle(rle, shape)
    with warnings.catch_warnings():  # pycocotools' numpy-2 ``copy=False`` DeprecationWarning, harmless here
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_util.decode(coco).astype(bool)


def rle_encode(mask: np.ndarray) -> str:
    """Encode a boolean (H, W) mask; inverse of :func:`rle_decode`."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = change[0::2], change[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends))


@dataclass
class Component:
    """One connected region of a mask: tight box (XYXY, pixel edges) and outer polygon(s)."""

    bbox: list[float]
    polygons: list[list[float]]
    area: int


def mask_components(mask: np.ndarray, min_area: int = 0) -> list[Component]:
    """Split a mask into 8-connected components with tight boxes and polygons.

    Boxes use pixel-edge coordinates: a component covering columns 3..5 has x0=3, x1=6.
    Components with fewer than ``min_area`` pixels are omitted (callers count them).
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    out = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        sub = (labels[y:y + h, x:x + w] == i).astype(np.uint8)
        contours, _ = cv2.findContours(sub, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polys = []
        for c in contours:
            pts = c.reshape(-1, 2).astype(np.float64) + [x, y]
            if len(pts) < 3:  # degenerate (line/point) component: use its box outline
                pts = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)
            polys.append(pts.reshape(-1).tolist())
        out.append(Component([float(x), float(y), float(x + w), float(y + h)], polys, area))
    return out
