"""Objectness-only boxes: defects of other datasets that teach the RPN what a defect looks like, and nothing else.

A base model learns proposals from its base classes' boxes alone, and its RPN then misses defects unlike them.
Boxes of other lines' defects (magnetic tile, Severstal) can teach class-agnostic objectness without naming a
class: an *objectness view* of a dataset moves every box of its images into ``objectness_boxes`` (XYXY_ABS) and
leaves ``annotations`` empty. The mapper turns them into instances of class -1: the RPN trains on them as on any
box, and the ROI heads leave the proposals on them out of their samples (neither defect nor background, so
another line's defect is never taught as background; see ``steel_fsd/modeling/objectness.py``).

Views carry the class list of the dataset they are trained beside (Detectron2 concatenates datasets of one
class list); their own class names are not used. Their images without boxes are kept as negatives (set
``DATALOADER.FILTER_EMPTY_ANNOTATIONS False`` so that Detectron2 keeps images without class boxes).
"""
from __future__ import annotations

import logging

from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode

from .subsets import register_derived

logger = logging.getLogger("steel_fsd")
OBJECTNESS_KEY = "objectness_boxes"

__all__ = ["OBJECTNESS_KEY", "objectness_view", "register_objectness_view"]


def objectness_view(dicts: list[dict]) -> list[dict]:
    """Each dict with its boxes moved to ``objectness_boxes`` (XYXY_ABS) and no annotation (masks dropped)."""
    return [dict(d, annotations=[], **{OBJECTNESS_KEY: [
        [float(v) for v in BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)]
        for a in d.get("annotations", [])]}) for d in dicts]


def register_objectness_view(name: str, parent: str, thing_classes: list[str]) -> None:
    """Register ``parent``'s objectness view as ``name`` (replacing it), with ``thing_classes`` as its metadata's
    class list (that of the datasets it is trained beside)."""
    def load() -> list[dict]:
        dicts = objectness_view(DatasetCatalog.get(parent))
        logger.info("%s: %d images, %d objectness-only boxes (from %s), %d without boxes", name, len(dicts),
                    sum(len(d[OBJECTNESS_KEY]) for d in dicts), parent, sum(not d[OBJECTNESS_KEY] for d in dicts))
        return dicts

    register_derived(name, load, parent, list(thing_classes), objectness_only=True)
