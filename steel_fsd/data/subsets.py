"""Derived datasets for few-shot protocols: a class subset of a registered dataset (a K-shot manifest's boxes
are registered by :func:`steel_fsd.fewshot.support.register_manifest`).

Both are registered in Detectron2's catalogs under names chosen by the caller; the names are labels only.
Everything a derived dataset is made of (parent, classes, manifest path and hash) is in its metadata.
"""
from __future__ import annotations

import logging
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .catalog import summary_line

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


def register_derived(name: str, load, parent: str, classes: list[str], **meta) -> None:
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

    register_derived(name, load, parent, classes, subset_of=parent_classes, drop_images_with_others=drop_images_with_others)
