"""Detectron2 registration of NEU-DET, Severstal, the magnetic-tile set, X-SDD (image labels only), the synthetic
versions and unions.

Registration is lazy: only folder existence is checked when registering; the annotations are loaded
on the first ``DatasetCatalog.get`` of any split and the load is shared by all splits of a dataset
(cached per process: a dataset rewritten on disk after its first load is not reloaded). Every ``get``
returns a fresh copy, so callers may modify the dicts.
"""
from __future__ import annotations

import functools
import logging
import os
import pickle
import time
from collections import Counter
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..utils.errors import UserError
from .errors import SkipLog
from .images import verify_images
from .magnetic_tile import MT_CLASSES, load_magnetic_tile
from .neu import NEU_CLASSES, load_neu_voc
from .severstal import SEVERSTAL_CLASSES, load_severstal, tile_dataset_dicts
from .xsdd import XSDD_CLASSES, load_xsdd

SPLITS = ("train", "val", "test")
DEFAULT_TILE = 256
UNION_ID_OFFSET = 10**7
VERIFY_ENV = "STEEL_FSD_VERIFY_IMAGES"
# (folder under the datasets root, registered name prefix) per loader kind
NEU_FOLDERS = (("neu-det", "neu"), ("neu-synth", "neu_synth"))
SEVERSTAL_FOLDERS = (("severstal", "severstal"), ("severstal-synth", "severstal_synth"))
MT_FOLDERS = (("magnetic-tile", "mt"),)
XSDD_FOLDERS = (("x-sdd", "xsdd"),)
# Loader kinds whose dicts carry image_labels and no box: registered with this evaluator_type (not "coco", so
# the trainer's build_evaluator refuses them by name instead of scoring boxes that do not exist) and
# image_level=True in their metadata.
IMAGE_LEVEL_KINDS = ("xsdd",)
IMAGE_LEVEL_EVALUATOR = "classification"
UNIONS = (("steel_mixed", ("neu", "severstal")), ("steel_mixed_synth", ("neu_synth", "severstal_synth")),
          ("steel_neu_mt", ("neu", "mt")))  # box-only NEU-DET beside the magnetic tiles' masks

logger = logging.getLogger("steel_fsd")


@functools.lru_cache(maxsize=None)
def _load(kind: str, root: str, class_names: tuple[str, ...], strict: bool) -> tuple[list[dict], SkipLog]:
    """The whole dataset and its skip counts, loaded once per process.

    Every image is decoded once here (unless ``STEEL_FSD_VERIFY_IMAGES=0``), so a corrupt, truncated or
    empty file stops the first load with an error naming it (strict) or is counted and left out, before
    any training starts.
    """
    skips = SkipLog(strict=strict)
    loader = {"neu": load_neu_voc, "severstal": load_severstal, "mt": load_magnetic_tile, "xsdd": load_xsdd}[kind]
    dicts = loader(root, class_names, skips=skips)
    if os.environ.get(VERIFY_ENV, "1") != "0":
        start = time.perf_counter()
        dicts = verify_images(dicts, skips, root)
        logger.info("%s: decoded %d images in %.1f s (%s=0 skips this check)", root, len(dicts),
                    time.perf_counter() - start, VERIFY_ENV)
    return dicts, skips


@functools.lru_cache(maxsize=None)
def _split(kind: str, root: str, class_names: tuple[str, ...], strict: bool, seed: int,
           fold: tuple[int, int] | None = None) -> dict[str, list[dict]]:
    from .splits import stratified_kfold, stratified_split

    dicts = _load(kind, root, class_names, strict)[0]
    return stratified_split(dicts, seed=seed) if fold is None else stratified_kfold(dicts, fold[1], fold[0], seed)


@functools.lru_cache(maxsize=None)
def _pickled(kind: str, root: str, class_names: tuple[str, ...], strict: bool, split: str | None, seed: int,
             tile: int | None, fold: tuple[int, int] | None = None) -> bytes:
    """One split's final dicts (tiled, or without the private ``_rles``), pickled for cheap fresh copies.

    Severstal is split by whole images first, then tiled, so no strip has tiles in two splits.
    """
    dicts = _load(kind, root, class_names, strict)[0] if split is None else \
        _split(kind, root, class_names, strict, seed, fold)[split]
    if tile:
        dicts = tile_dataset_dicts(dicts, tile=tile)
    else:
        dicts = [{k: v for k, v in d.items() if k != "_rles"} for d in dicts]
    return pickle.dumps(dicts, protocol=pickle.HIGHEST_PROTOCOL)


def summary_line(name: str, dicts: list[dict], class_names: Sequence[str], skips: SkipLog | None = None) -> str:
    """``"<name>: N images, boxes per class {...}, K negatives[, skips: ...]"``; for an image-level dataset (dicts
    with ``image_labels``, no box) ``"<name>: N images, images per class {...}[, skips: ...]"``."""
    if any("image_labels" in d for d in dicts) and not any(d.get("annotations") for d in dicts):
        images = Counter(c for d in dicts for c in set(d["image_labels"]))
        per_class = ", ".join(f"{c}: {images[i]}" for i, c in enumerate(class_names))
        line = f"{name}: {len(dicts)} images, images per class {{{per_class}}}"
        return line if skips is None else f"{line}, skips: {skips.summary()}"
    boxes = Counter(a["category_id"] for d in dicts for a in d.get("annotations", []))
    per_class = ", ".join(f"{c}: {boxes[i]}" for i, c in enumerate(class_names))
    negatives = sum(1 for d in dicts if not d.get("annotations"))
    line = f"{name}: {len(dicts)} images, boxes per class {{{per_class}}}, {negatives} negatives"
    return line if skips is None else f"{line}, skips: {skips.summary()}"


def _get(name: str, kind: str, root: str, class_names: tuple[str, ...], strict: bool, split: str | None,
         seed: int, tile: int | None, fold: tuple[int, int] | None = None) -> list[dict]:
    dicts = pickle.loads(_pickled(kind, root, class_names, strict, split, seed, tile, fold))
    line = summary_line(name, dicts, class_names, _load(kind, root, class_names, strict)[1])
    if split is not None:  # skips are counted while loading the folder, before it is split
        line = line.replace(", skips: ", f", skips in {os.path.basename(root)} (all splits): ")
    logger.info(line)
    return dicts


def _register(name: str, kind: str, root: str | os.PathLike, class_names: Sequence[str], split: str | None,
              seed: int, tile: int | None, strict: bool, fold: tuple[int, int] | None = None) -> None:
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: dataset folder not found (registering {name!r})")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if fold is not None and (split is None or len(fold) != 2 or not 0 <= fold[0] < fold[1]):
        raise ValueError(f"fold must be (index, folds) with a split, got {fold!r} for split {split!r}")
    classes = tuple(class_names)
    fold = tuple(fold) if fold is not None else None
    DatasetCatalog.register(name, functools.partial(_get, name, kind, root, classes, strict, split, seed, tile, fold))
    image_level = {"evaluator_type": IMAGE_LEVEL_EVALUATOR, "image_level": True} if kind in IMAGE_LEVEL_KINDS \
        else {"evaluator_type": "coco"}
    MetadataCatalog.get(name).set(thing_classes=list(classes), dataset_root=root, split=split or "all", seed=seed,
                                  fold=list(fold) if fold else None, tile=tile, **image_level)


def register_neu(name: str, root: str | os.PathLike, class_names: Sequence[str] = NEU_CLASSES,
                 split: str | None = None, seed: int = 0, strict: bool = True,
                 fold: tuple[int, int] | None = None) -> None:
    """Register NEU-DET at ``root`` (see :func:`~steel_fsd.data.neu.load_neu_voc`) as ``name``.

    ``split`` is ``"train"``, ``"val"``, ``"test"`` (seeded stratified 70/15/15 split) or None (all
    images); with ``fold=(i, k)`` the split is fold ``i`` of the seeded stratified ``k``-fold split
    (:func:`~steel_fsd.data.splits.stratified_kfold`: the k test splits partition the images). Raises
    FileNotFoundError when ``root`` is not a folder, AssertionError if ``name`` is taken.
    """
    _register(name, "neu", root, class_names, split, seed, None, strict, fold)


def neu_fold_names(folds: int, fold: int) -> dict[str, str]:
    """``{"train": "neu_k<folds>f<fold>_train", ...}``: the names :func:`register_neu_folds` registers."""
    return {s: f"neu_k{folds}f{fold}_{s}" for s in SPLITS}


def register_neu_folds(root: str | os.PathLike, folds: int, seed: int = 0) -> list[str]:
    """Register the ``folds`` folds of NEU-DET at ``root`` (:func:`register_neu` with ``fold``) under
    :func:`neu_fold_names`; names already registered are kept. Returns the names registered by this call."""
    new = []
    for fold in range(folds):
        for split, name in neu_fold_names(folds, fold).items():
            if name not in DatasetCatalog.list():
                register_neu(name, root, split=split, seed=seed, fold=(fold, folds))
                new.append(name)
    return new


def register_severstal(name: str, root: str | os.PathLike, split: str | None = None, seed: int = 0,
                       tile: int | None = None, strict: bool = True,
                       class_names: Sequence[str] = SEVERSTAL_CLASSES) -> None:
    """Register Severstal at ``root`` (see :func:`~steel_fsd.data.severstal.load_severstal`) as ``name``.

    ``split`` as in :func:`register_neu` (whole strips are split); ``tile`` (e.g. 256) registers
    square tiles of each split (32-pixel overlap) instead of the 1600x256 strips.
    """
    _register(name, "severstal", root, class_names, split, seed, tile, strict)


def register_magnetic_tile(name: str, root: str | os.PathLike, split: str | None = None, seed: int = 0,
                           strict: bool = True, class_names: Sequence[str] = MT_CLASSES) -> None:
    """Register the magnetic-tile set at ``root`` (see :func:`~steel_fsd.data.magnetic_tile.load_magnetic_tile`)
    as ``name``; ``split`` as in :func:`register_neu` (the defect-free ``MT_Free`` images are their own stratum,
    so every split keeps its share of them)."""
    _register(name, "mt", root, class_names, split, seed, None, strict)


def register_xsdd(name: str, root: str | os.PathLike, split: str | None = None, seed: int = 0,
                  strict: bool = True, class_names: Sequence[str] = XSDD_CLASSES) -> None:
    """Register X-SDD at ``root`` (the folder holding ``datas/``; see :func:`~steel_fsd.data.xsdd.load_xsdd`) as
    ``name``; ``split`` as in :func:`register_neu` (stratified by the image labels). Image labels only, no box:
    the metadata has ``image_level=True`` and ``evaluator_type="classification"`` (the detection evaluators
    refuse it), for backbone pretraining and classification probes."""
    _register(name, "xsdd", root, class_names, split, seed, None, strict)


def register_union(name: str, parts: Sequence[str], id_offset: int = UNION_ID_OFFSET) -> None:
    """Register the concatenation of registered datasets ``parts`` as ``name``.

    Classes are the parts' ``thing_classes`` in order (category ids and ``image_labels`` shifted accordingly);
    image ids of part ``i`` are shifted by ``i * id_offset``. Loading raises ValueError if image ids collide.
    """
    metas = [MetadataCatalog.get(p) for p in parts]
    offsets, classes = [], []
    for m in metas:
        offsets.append(len(classes))
        classes += list(m.thing_classes)

    def load() -> list[dict]:
        out = []
        for i, (part, cat_offset) in enumerate(zip(parts, offsets)):
            out += [dict(d, image_id=int(d["image_id"]) + i * id_offset,
                         annotations=[dict(a, category_id=a["category_id"] + cat_offset) for a in d["annotations"]],
                         **({"image_labels": [c + cat_offset for c in d["image_labels"]]} if "image_labels" in d
                            else {}))
                    for d in DatasetCatalog.get(part)]
        if len({d["image_id"] for d in out}) != len(out):
            raise ValueError(f"{name}: image ids of {list(parts)} collide with offset {id_offset}")
        logger.info(summary_line(name, out, classes))
        return out

    roots = [m.get("dataset_root") for m in metas]
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=classes, evaluator_type="coco", parts=list(parts),
        dataset_root=os.path.commonpath(roots) if all(roots) else None,
        split=metas[0].get("split") if len({m.get("split") for m in metas}) == 1 else "mixed",
        tile=metas[0].get("tile") if len({m.get("tile") for m in metas}) == 1 else "mixed",
        seed=metas[0].get("seed") if len({m.get("seed") for m in metas}) == 1 else None)


def steel_datasets() -> list[str]:
    """Registered datasets with a steel-fsd data root (not Detectron2's built-in COCO/VOC/... names)."""
    return sorted(n for n in DatasetCatalog.list() if MetadataCatalog.get(n).get("dataset_root") is not None
                  or MetadataCatalog.get(n).get("parts") is not None)


def require_registered(name: str, where: str, nonempty: bool = False) -> None:
    """Raise ``UserError`` naming the datasets root and the steel datasets found if ``name`` is not registered
    (and, with ``nonempty``, if it holds no image, e.g. a split left empty after splitting and tiling)."""
    if name in DatasetCatalog.list():
        if nonempty and not DatasetCatalog.get(name):
            meta = MetadataCatalog.get(name)
            raise UserError(f"dataset {name!r} has no image (split {meta.get('split', '?')} of "
                            f"{meta.get('dataset_root', 'its parts')})", where,
                            "add images to the dataset folder or use another split")
        return
    found = steel_datasets()
    raise UserError(f"dataset {name!r} is not registered", f"{where}",
                    f"the datasets root {datasets_root()} (set STEEL_FSD_DATASETS or pass --datasets-root) holds "
                    + (", ".join(found) if found else "no steel dataset (expected folders "
                       + ", ".join(f for f, _ in NEU_FOLDERS + SEVERSTAL_FOLDERS + MT_FOLDERS + XSDD_FOLDERS)
                       + ")"))


def forget_loaded() -> None:
    """Drop the per-process cache of loaded dataset folders (the next ``DatasetCatalog.get`` reads the files
    again): for a process that edits annotations and registers the folder again."""
    for cached in (_load, _split, _pickled):
        cached.cache_clear()


def dataset_digest(name: str) -> str:
    """sha256 (16 hex digits) of a registered dataset's content as a model sees it: every image's file name
    (relative to the dataset root), size, crop and annotations (boxes, classes, masks). Caches keyed by it
    (pixel statistics, the protocol's trained models) are rebuilt when an annotation or the image list changes.
    Image bytes are not read: replacing an image file under the same name keeps the digest."""
    import hashlib
    import json

    root = MetadataCatalog.get(name).get("dataset_root")
    h = hashlib.sha256()
    for d in DatasetCatalog.get(name):
        f = d.get("file_name", "")
        rel = os.path.relpath(f, root) if root and os.path.isabs(f) else f
        record = {k: v for k, v in d.items() if k not in ("file_name", "image_id")}
        h.update(json.dumps([rel, record], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def datasets_root() -> str:
    """``$STEEL_FSD_DATASETS`` if set, else ``./datasets`` (absolute)."""
    return os.path.abspath(os.environ.get("STEEL_FSD_DATASETS", "datasets"))


def register_all(root: str | os.PathLike | None = None) -> list[str]:
    """Register every dataset found under ``root`` and return the names registered by this call.

    ``root`` defaults to ``$STEEL_FSD_DATASETS``, else ``./datasets``. Folders: ``neu-det/``,
    ``neu-synth/`` (NEU layout), ``severstal/``, ``severstal-synth/`` (Severstal layout), ``magnetic-tile/``
    (``MT_<Class>/Imgs``, registered as ``mt_{train,val,test}``), ``x-sdd/`` (``datas/<class name>/<n>.jpg``,
    registered as ``xsdd_{train,val,test}``: image labels only, no box; metadata ``image_level=True``). Names:
    ``{neu,neu_synth,severstal,severstal_synth}_{train,val,test}``, ``severstal[_synth]_tiled_{split}``
    (256-pixel tiles) and the unions ``steel_mixed_{split}`` (neu + severstal strips),
    ``steel_mixed_synth_{split}`` and ``steel_neu_mt_{split}`` (neu + magnetic tile). Absent folders are
    skipped; names already registered are kept as they are (so calling it twice is harmless).
    """
    root = os.path.abspath(os.fspath(root)) if root is not None else datasets_root()
    new: list[str] = []

    def add(name: str, register, *args, **kwargs) -> None:
        if name in DatasetCatalog.list():
            logger.debug("%s already registered (root %s); not re-registered", name,
                         MetadataCatalog.get(name).get("dataset_root"))
            return
        register(name, *args, **kwargs)
        new.append(name)

    for folder, prefix in NEU_FOLDERS + SEVERSTAL_FOLDERS:
        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            continue
        for s in SPLITS:
            if (folder, prefix) in NEU_FOLDERS:
                add(f"{prefix}_{s}", register_neu, path, split=s)
            else:
                add(f"{prefix}_{s}", register_severstal, path, split=s)
                add(f"{prefix}_tiled_{s}", register_severstal, path, split=s, tile=DEFAULT_TILE)
    for folder, prefix in MT_FOLDERS:
        path = os.path.join(root, folder)
        if os.path.isdir(path):
            for s in SPLITS:
                add(f"{prefix}_{s}", register_magnetic_tile, path, split=s)
    for folder, prefix in XSDD_FOLDERS:
        path = os.path.join(root, folder)
        if os.path.isdir(path):
            for s in SPLITS:
                add(f"{prefix}_{s}", register_xsdd, path, split=s)
    for union, prefixes in UNIONS:
        for s in SPLITS:
            parts = [f"{p}_{s}" for p in prefixes]
            if all(p in DatasetCatalog.list() for p in parts):
                add(f"{union}_{s}", register_union, parts)
    return new
