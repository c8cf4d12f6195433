"""Export Detectron2 dataset dicts as COCO instances JSON (loadable by pycocotools and Detectron2)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from detectron2.structures import BoxMode

from ..utils.io import write_json


def polygon_area(polygons: Sequence[Sequence[float]]) -> float:
    """Total area of flat ``[x0, y0, x1, y1, ...]`` polygons (shoelace formula, one per polygon, summed)."""
    total = 0.0
    for p in polygons:
        xs, ys = p[0::2], p[1::2]
        total += abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2.0
    return total


def _coco_annotation(ann: dict, ann_id: int, image_id: int, num_classes: int, where: str) -> dict:
    if "bbox_mode" not in ann:
        raise ValueError(f"{where}: annotation without bbox_mode")
    x0, y0, x1, y1 = BoxMode.convert(list(map(float, ann["bbox"])), ann["bbox_mode"], BoxMode.XYXY_ABS)
    cid = int(ann["category_id"])
    if not 0 <= cid < num_classes:
        raise ValueError(f"{where}: category_id {cid} outside 0..{num_classes - 1}")
    out = {"id": ann_id, "image_id": image_id, "category_id": cid + 1,
           "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
           "iscrowd": int(ann.get("iscrowd", 0))}
    segm = ann.get("segmentation")
    if segm is not None:
        if not isinstance(segm, list):
            raise ValueError(f"{where}: only polygon segmentations can be exported, got {type(segm).__name__}")
        out["segmentation"] = [[float(v) for v in poly] for poly in segm]
        out["area"] = polygon_area(out["segmentation"])
    if "difficult" in ann:
        out["difficult"] = int(ann["difficult"])
    return out


def to_coco(dicts: list[dict], class_names: Sequence[str], dataset_name: str,
            image_root: str | os.PathLike | None = None) -> dict:
    """COCO instances dict for Detectron2 dataset dicts (boxes in any absolute BoxMode).

    Image ids are the dicts' ``image_id``; category ids are the contiguous ids + 1; annotation ids
    count from 1 in image order. ``bbox`` is XYWH; ``area`` is the polygon area when a
    ``segmentation`` is present, else the box area. Images without annotations are kept. With
    ``image_root``, ``file_name`` is written relative to it (portable files; register with the same
    root). Tiles (dicts with ``crop_box``) cannot be expressed in COCO and raise ValueError.
    """
    images, annotations = [], []
    seen: set[int] = set()
    for d in sorted(dicts, key=lambda d: d["image_id"]):
        where = f"{dataset_name}: image {d.get('image_key', d['image_id'])!r}"
        if d.get("crop_box") is not None:
            raise ValueError(f"{where}: tiled dataset dicts (crop_box) cannot be exported to COCO; "
                             "export the untiled dataset instead")
        image_id = int(d["image_id"])
        if image_id in seen:
            raise ValueError(f"{where}: duplicate image_id {image_id}")
        seen.add(image_id)
        file_name = str(d["file_name"])
        if image_root is not None:
            file_name = Path(os.path.relpath(file_name, image_root)).as_posix()
        images.append({"id": image_id, "file_name": file_name,
                       "height": int(d["height"]), "width": int(d["width"])})
        for ann in d.get("annotations", []):
            annotations.append(_coco_annotation(ann, len(annotations) + 1, image_id, len(class_names), where))
    return {
        "info": {"description": dataset_name, "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "defect"} for i, n in enumerate(class_names)],
    }


def write_coco(path: str | os.PathLike, coco: dict) -> None:
    """Write a COCO dict as compact, deterministic JSON (atomically: temp file, then rename)."""
    write_json(path, coco, compact=True, sort_keys=False)
