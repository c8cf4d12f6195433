"""Derived datasets for few-shot protocols: a class subset of a registered dataset, and a K-shot manifest's boxes.

Both are registered in Detectron2's catalogs under names chosen by the caller; the names are labels only.
Everything a derived dataset is made of (parent, classes, manifest path and hash) is in its metadata.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .catalog import summary_line
from ..utils.io import file_sha256

logger = logging.getLogger("steel_fsd")


def restrict_classes(dicts: list[dict], class_names: Sequence[str], keep: Sequence[str],
                     drop_images_with_others: bool = False) -> list[dict]:
    """Dataset dicts with only the boxes of ``keep`` (category ids re-indexed in ``keep`` order).

    With ``drop_images_with_others``, images holding any box of another class are removed instead of
    keeping them with those boxes erased (so, in base training, a novel defect is never learned as
    background). Raises ValueError for classes not in ``class_names``.
    """
    class_names, keep = list(class_names), list(keep)
    unknown = sorted(set(keep) - set(class_names))
    if unknown:
        raise ValueError(f"classes {unknown} are not among {class_names}")
    idx = [class_names.index(c) for c in keep]
    out = []
    for d in dicts:
        anns = d.get("annotations", [])
        if drop_images_with_others and any(a["category_id"] not in idx for a in anns):
            continue
        out.append(dict(d, annotations=[dict(a, category_id=idx.index(a["category_id"])) for a in anns
                                        if a["category_id"] in idx]))
    return out


def _register(name: str, load, parent: str, classes: list[str], **meta) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    pm = MetadataCatalog.get(parent)
    MetadataCatalog.get(name).set(thing_classes=list(classes), evaluator_type="coco", parent=parent,
                                  dataset_root=pm.get("dataset_root"), **meta)


def register_class_subset(name: str, parent: str, classes: Sequence[str], drop_images_with_others: bool = True) -> None:
    """Register ``parent`` restricted to ``classes`` (see :func:`restrict_classes`) as ``name`` (replacing it)."""
    parent_classes = list(MetadataCatalog.get(parent).thing_classes)
    classes = list(classes)
    restrict_classes([], parent_classes, classes)  # validate the names now, not at first load

    def load() -> list[dict]:
        dicts = restrict_classes(DatasetCatalog.get(parent), parent_classes, classes, drop_images_with_others)
        logger.info(summary_line(name, dicts, classes))
        return dicts

    _register(name, load, parent, classes, subset_of=parent_classes, drop_images_with_others=drop_images_with_others)


def register_manifest(name: str, parent: str, manifest_path: str | Path) -> dict:
    """Register the support boxes of a K-shot manifest (tools/prepare_fewshot.py) drawn from ``parent`` as ``name``.

    Each image keeps only its manifest boxes (see :func:`~steel_fsd.data.support.manifest_support_dicts`).
    Returns the manifest. Raises ValueError when the manifest was drawn from another class list.
    """
    from .support import load_manifest, manifest_support_dicts

    manifest = load_manifest(manifest_path)
    classes = list(MetadataCatalog.get(parent).thing_classes)
    if manifest["class_names"] != classes:
        raise ValueError(f"{manifest_path}: manifest classes {manifest['class_names']} != {parent}'s {classes}")
    digest = file_sha256(manifest_path)

    def load() -> list[dict]:
        dicts = manifest_support_dicts(manifest, DatasetCatalog.get(parent))
        logger.info(summary_line(name, dicts, classes))
        return dicts

    _register(name, load, parent, classes, manifest=str(manifest_path), manifest_sha256=digest,
              shots=manifest["shots"], seed=manifest["seed"])
    return manifest
