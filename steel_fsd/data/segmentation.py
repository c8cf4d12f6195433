"""Few-shot segmentation data: per-class defect masks of dataset dicts, and seeded support/query episodes.

A dataset dict with instance masks (polygons or COCO RLE in ``segmentation``: the magnetic-tile set, Severstal,
COCO files with masks) gives one binary mask per class present (:func:`class_masks`). An episode of class ``c``
is K support images of ``c`` with their ``c`` masks and one query image of ``c``; folds make each class novel
once (:func:`fold_split`): the episodes a model trains on hold only images without the novel class.
"""
from __future__ import annotations

import numpy as np

from .mapper import polygons_to_rle

__all__ = ["class_masks", "images_by_class", "fold_split", "sample_supports"]


def _annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_util

    seg = ann["segmentation"]
    if isinstance(seg, dict):  # COCO RLE (counts as text or as a list of run lengths)
        rle = mask_util.frPyObjects(seg, height, width) if isinstance(seg.get("counts"), list) else seg
    else:
        rle = polygons_to_rle(seg, height, width)
    return mask_util.decode(rle).astype(bool)


def class_masks(record: dict) -> dict[int, np.ndarray]:
    """``{category_id: HxW bool}``: the union of the record's instance masks per class (image pixels). An
    annotation without ``segmentation`` raises ``ValueError`` naming the image (its extent is unknown)."""
    h, w = int(record["height"]), int(record["width"])
    out: dict[int, np.ndarray] = {}
    for ann in record.get("annotations", []):
        if not ann.get("segmentation"):
            raise ValueError(f"{record['file_name']}: an annotation of class {ann['category_id']} has no mask; "
                             "few-shot segmentation needs masks on every defect")
        c = int(ann["category_id"])
        out[c] = out.get(c, np.zeros((h, w), bool)) | _annotation_mask(ann, h, w)
    return out


def images_by_class(dicts: list[dict]) -> dict[int, list[int]]:
    """``{category_id: [indices of the dicts with that class]}`` (sorted; images without defects in none)."""
    out: dict[int, list[int]] = {}
    for i, r in enumerate(dicts):
        for c in sorted({int(a["category_id"]) for a in r.get("annotations", [])}):
            out.setdefault(c, []).append(i)
    return out


def fold_split(dicts: list[dict], novel: int) -> tuple[dict[int, list[int]], list[int]]:
    """Training episodes of one fold: ``({base class: image indices}, excluded)``. Every image that holds the
    novel class is excluded, so the novel class is never seen (not even as background)."""
    by_class = images_by_class(dicts)
    excluded = sorted(set(by_class.get(novel, [])))
    drop = set(excluded)
    base = {c: [i for i in idx if i not in drop] for c, idx in by_class.items() if c != novel}
    return {c: idx for c, idx in base.items() if idx}, excluded


def sample_supports(candidates: list[int], k: int, rng: np.random.Generator, exclude: int | None = None) -> list[int]:
    """``k`` distinct indices of ``candidates`` (not ``exclude``, the query), drawn by ``rng``; ``ValueError``
    when fewer than ``k`` remain."""
    pool = [i for i in candidates if i != exclude]
    if len(pool) < k:
        raise ValueError(f"{k} support images asked for, {len(pool)} available")
    return [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
