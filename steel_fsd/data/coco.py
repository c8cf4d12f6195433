"""Export Detectron2 dataset dicts as COCO instances JSON (loadable by pycocotools and Detectron2)."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict

from ..utils.io import write_json


def _check(d: dict, num_classes: int, seen: set[int], where: str) -> None:
    """The errors Detectron2's exporter would not give (or give without naming the image)."""
    if d.get("crop_box") is not None:
        raise ValueError(f"{where}: tiled dataset dicts (crop_box) cannot be exported to COCO; "
                         "export the untiled dataset instead")
    image_id = int(d["image_id"])
    if image_id in seen:
        raise ValueError(f"{where}: duplicate image_id {image_id}")
    seen.add(image_id)
    for ann in d.get("annotations", []):
        if "bbox_mode" not in ann:
            raise ValueError(f"{where}: annotation without bbox_mode")
        cid = int(ann["category_id"])
        if not 0 <= cid < num_classes:
            raise ValueError(f"{where}: category_id {cid} outside 0..{num_classes - 1}")
        segm = ann.get("segmentation")
        if segm is not None and not isinstance(segm, list):
            raise ValueError(f"{where}: only polygon segmentations can be exported, got {type(segm).__name__}")


def to_coco(dicts: list[dict], class_names: Sequence[str], dataset_name: str,
            image_root: str | os.PathLike | None = None) -> dict:
    """COCO instances dict for Detectron2 dataset dicts (boxes in any absolute BoxMode), made by Detectron2's
    ``convert_to_coco_dict``.

    Images are in ``image_id`` order with the dicts' ids; category ids are the contiguous ids + 1; annotation
    ids count from 1 in image order. ``bbox`` is XYWH; ``area`` is the polygon area when a ``segmentation``
    is present, else the box area. Images without annotations are kept; ``difficult`` flags are kept. With
    ``image_root``, ``file_name`` is written relative to it (portable files; register with the same root).
    Tiles (dicts with ``crop_box``) cannot be expressed in COCO and raise ValueError, as do duplicate image
    ids, category ids outside the classes and non-polygon segmentations, each naming the image.
    """
    ordered = sorted(dicts, key=lambda d: d["image_id"])
    seen: set[int] = set()
    for d in ordered:
        _check(d, len(class_names), seen, f"{dataset_name}: image {d.get('image_key', d['image_id'])!r}")
    tmp = f"__steel_fsd_coco_export_{uuid.uuid4().hex}"
    DatasetCatalog.register(tmp, lambda: ordered)
    MetadataCatalog.get(tmp).set(thing_classes=list(class_names),
                                 thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(class_names))})
    try:
        coco = convert_to_coco_dict(tmp)
    finally:
        DatasetCatalog.remove(tmp)
        MetadataCatalog.remove(tmp)
    coco.setdefault("annotations", [])  # Detectron2 leaves the key out when no image has a box
    src = [a for d in ordered for a in d.get("annotations", [])]  # the exporter's annotation order
    for ann, a in zip(coco["annotations"], src):
        if "difficult" in a:
            ann["difficult"] = int(a["difficult"])
    if image_root is not None:
        for img in coco["images"]:
            img["file_name"] = Path(os.path.relpath(img["file_name"], image_root)).as_posix()
    for cat in coco["categories"]:
        cat["supercategory"] = "defect"
    coco.update(info={"description": dataset_name, "version": "1.0"}, licenses=[])  # no timestamp: reproducible
    return coco


def write_coco(path: str | os.PathLike, coco: dict) -> None:
    """Write a COCO dict as compact, deterministic JSON (atomically: temp file, then rename)."""
    write_json(path, coco, compact=True, sort_keys=False)
