"""Image and label sources for backbone pretraining: several datasets at once, never a held-out image.

Each pretraining image carries its source (the dataset it came from, or ``""`` for image folders) in the key
``pretrain_source``. Labels are per source: an image's label vector is over its own dataset's classes (box
classes and image-level labels alike), and the encoder has one classifier per labelled source, so NEU-DET's six
classes, X-SDD's seven and the magnetic tile's five are learned side by side on one backbone.

Two rules keep pretraining honest:

* **no held-out image**: an image file that belongs to a validation or test split of any registered steel
  dataset is refused (:func:`check_no_held_out`); the choices made on validation and the numbers reported on
  test would otherwise have seen those pixels;
* **no novel class**: with ``exclude`` (a base/novel setting's novel classes), every image holding a box or an
  image label of one of those classes is left out of every source, labelled or not (:func:`drop_classes`).
"""
from __future__ import annotations

import logging
import os

import torch

from ..data.splits import image_classes
from ..utils.errors import UserError

logger = logging.getLogger("steel_fsd")
SOURCE_KEY = "pretrain_source"
HELD_OUT_SPLITS = ("val", "test")


def held_out_files(files: list[str] | None = None) -> dict[str, str]:
    """``{real path of an image file: registered split holding it}`` over the registered steel datasets whose split
    is validation or test; with ``files``, only the datasets whose root folder holds one of them are read."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..data.catalog import steel_datasets

    folders = None if files is None else {os.path.dirname(os.path.realpath(f)) for f in files}

    def relevant(root) -> bool:
        if folders is None:
            return True
        if not root:
            return False
        root = os.path.realpath(root)
        return any(f == root or f.startswith(root + os.sep) for f in folders)

    out: dict[str, str] = {}
    for name in steel_datasets():
        meta = MetadataCatalog.get(name)
        if meta.get("split") not in HELD_OUT_SPLITS or meta.get("parts") is not None or \
                not relevant(meta.get("dataset_root")):
            continue  # (a union's parts are registered on their own)
        for d in DatasetCatalog.get(name):
            out.setdefault(os.path.realpath(d["file_name"]), name)
    return out


def check_no_held_out(dicts: list[dict], where: str) -> None:
    """``UserError`` naming the first offending file and split if an image of ``dicts`` is in a validation or
    test split of a registered steel dataset (compared by real file path, so tiles of a held-out strip count).
    Only the datasets whose folders hold some of these images are read."""
    held = held_out_files([d["file_name"] for d in dicts])
    bad = [(d["file_name"], held[p]) for d in dicts if (p := os.path.realpath(d["file_name"])) in held]
    if bad:
        raise UserError(f"{len(bad)} pretraining images belong to held-out splits (first: {bad[0][0]} in "
                        f"{bad[0][1]}); choices on validation and numbers on test must not have seen them", where,
                        "pretrain on training splits (e.g. neu_train xsdd_train mt_train severstal_tiled_train) or "
                        "folders that hold no validation or test image")


def drop_classes(dicts: list[dict], class_names: dict[str, list[str]], exclude: list[str]) -> list[dict]:
    """The images of ``dicts`` holding no box or image label of a class named in ``exclude``; ``class_names``:
    ``{source: its class names}``. Counted in the log; unknown names raise ``UserError``."""
    known = {c for names in class_names.values() for c in names}
    unknown = sorted(set(exclude) - known)
    if unknown:
        raise UserError(f"--exclude-classes {unknown}: no source has these classes", "--exclude-classes",
                        f"choose from {sorted(known)}")
    kept = []
    for d in dicts:
        names = class_names.get(d.get(SOURCE_KEY, ""), [])
        if not any(names[c] in exclude for c in image_classes(d)):
            kept.append(d)
    logger.info("pretrain: %d of %d images hold none of %s; the others are not used", len(kept), len(dicts), exclude)
    return kept


def label_targets(dicts: list[dict], spaces: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Per labelled source ``s``: an (N, len(spaces[s])) multi-hot target over that source's classes ``spaces[s]``
    (contiguous ids) for every image of ``dicts`` (rows of images from other sources are zero and unused).
    Classes of the source outside its space are ignored."""
    out = {}
    for source, classes in spaces.items():
        index = {c: i for i, c in enumerate(classes)}
        y = torch.zeros(len(dicts), len(classes))
        for n, d in enumerate(dicts):
            if d.get(SOURCE_KEY, "") == source:
                for c in image_classes(d):
                    if c in index:
                        y[n, index[c]] = 1.0
        out[source] = y
    return out


def source_masks(dicts: list[dict], sources) -> dict[str, torch.Tensor]:
    """``{source: (N,) bool}``: which images come from each of ``sources``."""
    tags = [d.get(SOURCE_KEY, "") for d in dicts]
    return {s: torch.tensor([t == s for t in tags]) for s in sources}
