"""A user's own datasets, registered from the command line or a YAML file, in the formats they already have.

A dataset is ``NAME=FORMAT:PATH[:ANN]`` (``--dataset``; registered as ``NAME`` with all its images and
``NAME_train``/``NAME_val``/``NAME_test``, a seeded 70/15/15 split stratified by class) or an entry of a datasets file (``--datasets-file``
or ``$STEEL_FSD_DATASETS_FILE``)::

    datasets:
      - name: plates
        format: coco                 # coco | voc | yolo | severstal | masks | csv
        path: /data/plates/images    # the image folder (voc, severstal, masks: the dataset folder)
        annotations: /data/plates/train.json
        classes: [scratch, dent]     # optional: kept in this order; default: from the annotations
        split: [0.7, 0.15, 0.15]     # plates_train/_val/_test: seeded, stratified (this is the default;
                                     # null registers only "plates", e.g. for one file per split)
        seed: 0

Formats (``PATH`` / ``ANN``):

* ``coco``: image folder / COCO instances JSON (boxes, polygons or RLE masks), read by Detectron2's
  ``load_coco_json``; classes are the JSON's categories.
* ``voc``: a Pascal VOC folder (``Annotations/*.xml`` beside ``JPEGImages/`` or ``images/``, as NEU-DET);
  classes are the ``<name>`` values found, sorted.
* ``yolo``: image folder / label folder (default: ``labels`` beside ``images``), one ``<stem>.txt`` per image
  with ``class cx cy w h`` or a polygon ``class x1 y1 x2 y2 ...`` (normalized); classes from ``classes:``,
  else ``classes.txt`` or a ``data.yaml`` ``names`` in the label folder or its parent.
* ``severstal``: a folder with ``train.csv`` (or ``train_v2.csv``) and ``train_images/``.
* ``masks``: one sub-folder per class (``<Class>/`` or ``<Class>/Imgs/``; a folder named ``free`` or
  ``good`` holds defect-free images) with ``<stem>.png`` masks beside the images, as the magnetic-tile set.
* ``csv``: image folder / a CSV with the header ``image,x1,y1,x2,y2,class`` (pixel corners; an image listed
  with empty coordinates is a defect-free image).

Every format goes through the same checks and counted skips as the built-in sets (a problem names the file
and line). Registration is lazy: class names are read when registering, the annotations at first use.
"""
from __future__ import annotations

import csv
import functools
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from ..utils.errors import UserError
from ..utils.io import read_json, read_yaml
from .catalog import SPLITS, summary_line
from .errors import DatasetError, SkipLog

FORMATS = ("coco", "voc", "yolo", "severstal", "masks", "csv")
FILE_ENV = "STEEL_FSD_DATASETS_FILE"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
FREE_FOLDERS = ("free", "good", "ok")
DEFAULT_SPLIT = (0.7, 0.15, 0.15)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")

logger = logging.getLogger("steel_fsd")


@dataclass
class DatasetSpec:
    """One user dataset: where it is, in which format, and how to split it."""
    name: str
    format: str
    path: str
    annotations: str = ""
    classes: list[str] | None = None
    split: Sequence[float] | None = DEFAULT_SPLIT
    seed: int = 0
    where: str = "--dataset"
    strict: bool = True

    def __post_init__(self):
        hint = "write NAME=FORMAT:PATH[:ANN], e.g. plates=coco:images/:train.json"
        if not _NAME.fullmatch(self.name or ""):
            raise UserError(f"dataset name {self.name!r} is not a plain name (letters, digits, _ . -)", self.where, hint)
        if self.format not in FORMATS:
            raise UserError(f"dataset {self.name!r}: unknown format {self.format!r}", self.where,
                            f"use one of {', '.join(FORMATS)}")
        if not self.path:
            raise UserError(f"dataset {self.name!r} has no path", self.where, hint)
        if self.format in ("coco", "csv") and not self.annotations:
            raise UserError(f"dataset {self.name!r} ({self.format}) needs its annotation file", self.where,
                            f"add it after the image folder: {self.name}={self.format}:{self.path}:annotations."
                            + ("json" if self.format == "coco" else "csv"))
        if self.classes is not None:
            names = [str(c) for c in self.classes]
            if not names or any(not c.strip() for c in names) or len(set(names)) != len(names):
                raise UserError(f"dataset {self.name!r}: classes {self.classes!r} must be distinct, non-empty names",
                                self.where, "list each class once")
            self.classes = names
        if self.split is not None:
            s = self.split
            if (not isinstance(s, (list, tuple)) or len(s) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in s)
                    or sum(s) <= 0):
                raise UserError(f"dataset {self.name!r}: split {s!r}", self.where,
                                "give three non-negative fractions for train, val, test, e.g. [0.7, 0.15, 0.15]")
            self.split = [float(x) for x in s]


def parse_spec(text: str, where: str = "--dataset") -> DatasetSpec:
    """``NAME=FORMAT:PATH[:ANN]`` as a :class:`DatasetSpec` (a ``:`` inside a Windows drive letter is not
    supported; use a datasets file there)."""
    name, eq, rest = text.partition("=")
    fmt, colon, paths = rest.partition(":")
    if not eq or not colon:
        raise UserError(f"{text!r} is not NAME=FORMAT:PATH[:ANN]", where,
                        "e.g. --dataset plates=coco:data/images:data/train.json")
    path, _, ann = paths.partition(":")
    return DatasetSpec(name.strip(), fmt.strip().lower(), path, ann, where=f"{where} {text}")


def read_datasets_file(path: str | os.PathLike) -> list[DatasetSpec]:
    """The datasets of a YAML file (see the module docstring); relative paths are relative to the file."""
    doc = read_yaml(path, "datasets file")
    entries = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: no 'datasets:' list", "datasets file", "see steel_fsd/data/custom.py for the format")
    base = Path(path).resolve().parent
    allowed = {"name", "format", "path", "annotations", "classes", "split", "seed", "strict"}
    out = []
    for i, e in enumerate(entries):
        where = f"{path}, datasets[{i}]"
        if not isinstance(e, dict):
            raise UserError(f"entry {i} is not a mapping", where, "give name, format, path (and annotations)")
        unknown = sorted(set(e) - allowed)
        if unknown:
            raise UserError(f"unknown keys {unknown}", where, f"the keys are {sorted(allowed)}")
        missing = [k for k in ("name", "format", "path") if not e.get(k)]
        if missing:
            raise UserError(f"missing {missing}", where, "every dataset needs name, format and path")
        rel = lambda p: str(base / p) if p and not os.path.isabs(str(p)) else str(p or "")  # noqa: E731
        seed = e.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed {seed!r} is not an integer", where, "give an integer seed")
        out.append(DatasetSpec(str(e["name"]), str(e["format"]).lower(), rel(e["path"]), rel(e.get("annotations")),
                               e.get("classes"), e.get("split", DEFAULT_SPLIT), seed, where,
                               bool(e.get("strict", True))))
    return out


# ---- loaders: each returns (dataset dicts, class names) ------------------------------------------------------

def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(str(folder), "image folder not found")
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTS and p.is_file()}


def _size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError as e:
        raise DatasetError(str(path), f"cannot read the image header ({e})") from None


def voc_class_names(root: str | os.PathLike) -> list[str]:
    """The sorted ``<object><name>`` values of every VOC XML under ``root``."""
    import xml.etree.ElementTree as ET

    from .neu import annotation_dirs

    names = set()
    for d in annotation_dirs(root):
        for xml in sorted(d.glob("*.xml")):
            try:
                names |= {(o.findtext("name") or "").strip() for o in ET.parse(xml).getroot().iter("object")}
            except ET.ParseError as e:
                raise DatasetError(str(xml), f"not valid XML ({e})") from None
    names.discard("")
    if not names:
        raise DatasetError(str(root), "no <object><name> in any VOC file (Annotations/*.xml)")
    return sorted(names)


def coco_categories(json_file: str) -> dict[int, str]:
    """``{category id: name}`` of a COCO JSON, in id order."""
    doc = read_json(json_file, "COCO annotations")
    cats = doc.get("categories") if isinstance(doc, dict) else None
    if not isinstance(cats, list) or not cats or not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise DatasetError(json_file, "no 'categories' list with id and name")
    return {c["id"]: str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])}


def _load_coco(spec: DatasetSpec, skips: SkipLog) -> list[dict]:
    from detectron2.data.datasets import load_coco_json

    by_id = coco_categories(spec.annotations)
    keep = spec_classes(spec)
    dicts = load_coco_json(spec.annotations, spec.path, dataset_name=None)  # raw category ids
    out = []
    for d in dicts:
        anns = []
        for a in d.get("annotations", []):
            name = by_id.get(a["category_id"])
            if name not in keep:
                skips.note("class not kept" if name is not None else "unknown category")
                continue
            box = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)  # as every loader gives them
            if box[2] <= box[0] or box[3] <= box[1]:
                skips.note("zero-area box")
                continue
            anns.append(dict(a, bbox=box, bbox_mode=BoxMode.XYXY_ABS, category_id=keep.index(name)))
        d["annotations"] = anns
        d["image_key"] = os.path.relpath(d["file_name"], spec.path)
        out.append(d)
    return out


def yolo_class_names(labels: Path) -> list[str] | None:
    """Class names from ``classes.txt`` or a ``data.yaml`` (``names``: list or id mapping) in ``labels`` or its
    parent; None when there is neither."""
    for folder in (labels, labels.parent):
        if (folder / "classes.txt").is_file():
            return [line.strip() for line in (folder / "classes.txt").read_text().splitlines() if line.strip()]
        for y in ("data.yaml", "dataset.yaml"):
            if (folder / y).is_file():
                names = (read_yaml(folder / y, "YOLO data file") or {}).get("names")
                if isinstance(names, dict):
                    return [str(names[k]) for k in sorted(names)]
                if isinstance(names, list):
                    return [str(n) for n in names]
    return None


def _yolo_labels(spec: DatasetSpec) -> Path:
    if spec.annotations:
        return Path(spec.annotations)
    p = Path(spec.path)
    return p.parent / "labels" if p.name == "images" else p


def _load_yolo(spec: DatasetSpec, skips: SkipLog) -> list[dict]:
    labels = _yolo_labels(spec)
    names = spec_classes(spec)
    out = []
    for stem, img in _images_by_stem(Path(spec.path)).items():
        txt = labels / f"{stem}.txt"
        h, w = _size(img)
        anns = []
        lines = txt.read_text().splitlines() if txt.is_file() else []
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                cls, vals = int(parts[0]), [float(v) for v in parts[1:]]
            except ValueError:
                skips.problem("bad label line", str(txt), f"not numbers: {line.strip()[:60]!r}", line=n)
                continue
            if not 0 <= cls < len(names):
                skips.problem("unknown class id", str(txt), f"class {cls} but {len(names)} names", line=n)
                continue
            if len(vals) == 4:
                cx, cy, bw, bh = vals
                box, poly = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], None
            elif len(vals) >= 6 and len(vals) % 2 == 0:
                xs, ys = [v * w for v in vals[0::2]], [v * h for v in vals[1::2]]
                poly = [c for xy in zip(xs, ys) for c in xy]
                box = [min(xs), min(ys), max(xs), max(ys)]
            else:
                skips.problem("bad label line", str(txt), f"{len(vals)} coordinates (4 for a box, an even number >= 6 "
                              "for a polygon)", line=n)
                continue
            if not all(map(math.isfinite, vals)) or not all(-1e-6 <= v <= 1 + 1e-6 for v in vals):
                skips.problem("bad label line", str(txt), "coordinates must be normalized to [0, 1]", line=n)
                continue
            if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                skips.note("zero-area box")
                continue
            ann = {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": cls}
            if poly is not None:
                ann["segmentation"] = [poly]
            anns.append(ann)
        out.append({"file_name": str(img.resolve()), "height": h, "width": w, "annotations": anns,
                    "image_key": str(img.relative_to(spec.path))})
    return out


CSV_HEADER = ["image", "x1", "y1", "x2", "y2", "class"]


def csv_class_names(csv_file: str) -> list[str]:
    with open(csv_file, newline="") as f:
        rows = list(csv.DictReader(f))
    return sorted({(r.get("class") or "").strip() for r in rows} - {""})


def _load_csv(spec: DatasetSpec, skips: SkipLog) -> list[dict]:
    with open(spec.annotations, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if header != CSV_HEADER:
            raise DatasetError(spec.annotations, f"header {header} is not {','.join(CSV_HEADER)}", line=1)
        rows = list(enumerate(reader, 2))
    names = spec_classes(spec)
    images = _images_by_stem(Path(spec.path))
    by_name = {p.name: p for p in images.values()} | {str(p.relative_to(spec.path)): p for p in images.values()}
    per_image: dict[Path, list[dict]] = {}
    for line, row in rows:
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != 6:
            skips.problem("bad CSV row", spec.annotations, f"{len(row)} fields, expected 6", line=line)
            continue
        image, *coords, cls = (c.strip() for c in row)
        img = by_name.get(image)
        if img is None:
            skips.problem("missing image", spec.annotations, f"{image!r} is not in {spec.path}", line=line)
            continue
        anns = per_image.setdefault(img, [])
        if not any(coords) and not cls:
            continue  # a defect-free image
        try:
            x1, y1, x2, y2 = (float(c) for c in coords)
        except ValueError:
            skips.problem("bad CSV row", spec.annotations, f"coordinates {coords} are not numbers", line=line)
            continue
        if not all(map(math.isfinite, (x1, y1, x2, y2))):
            skips.problem("bad CSV row", spec.annotations, "non-finite coordinates", line=line)
            continue
        if cls not in names:
            skips.note("class not kept")
            continue
        if x2 <= x1 or y2 <= y1:
            skips.note("zero-area box" if (x2 == x1 or y2 == y1) else "inverted box")
            continue
        anns.append({"bbox": [x1, y1, x2, y2], "bbox_mode": BoxMode.XYXY_ABS, "category_id": names.index(cls)})
    out = []
    for img, anns in sorted(per_image.items()):
        h, w = _size(img)
        out.append({"file_name": str(img.resolve()), "height": h, "width": w, "annotations": anns,
                    "image_key": str(img.relative_to(spec.path))})
    return out


def mask_class_folders(root: Path) -> dict[str, Path]:
    """``{class name: folder holding its images and masks}`` (``<Class>/Imgs`` if present, else ``<Class>``)."""
    if not root.is_dir():
        raise DatasetError(str(root), "dataset folder not found")
    out = {}
    for p in sorted(root.iterdir()):
        if p.is_dir():
            name = p.name[3:] if p.name.startswith("MT_") else p.name
            out[name.lower()] = p / "Imgs" if (p / "Imgs").is_dir() else p
    if not out:
        raise DatasetError(str(root), "no class folders: expected <Class>/<name>.jpg with <name>.png masks")
    return out


def _load_masks(spec: DatasetSpec, skips: SkipLog) -> list[dict]:
    from .magnetic_tile import image_instances

    folders = mask_class_folders(Path(spec.path))
    names = spec_classes(spec)
    out = []
    for name, folder in folders.items():
        free = name in FREE_FOLDERS
        if not free and name not in names:
            skips.note("class not kept")
            continue
        for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.suffix.lower() != ".png"):
            found = image_instances(img.with_suffix(".png"), None if free else names.index(name), skips)
            if found is None:
                continue
            mask, anns = found
            h, w = mask.shape
            out.append({"file_name": str(img.resolve()), "height": int(h), "width": int(w), "annotations": anns,
                        "image_key": f"{folder.relative_to(spec.path)}/{img.stem}"})
    return out


def _load_voc(spec: DatasetSpec, skips: SkipLog) -> list[dict]:
    from .neu import load_neu_voc

    return load_neu_voc(spec.path, spec_classes(spec), skips=skips)


def _load_severstal(spec: DatasetSpec, skips: SkipLog) -> list[dict]:
    from .severstal import load_severstal

    return load_severstal(spec.path, spec_classes(spec), skips=skips)  # severstal.py's layout and checks


LOADERS = {"coco": _load_coco, "voc": _load_voc, "yolo": _load_yolo, "severstal": _load_severstal,
           "masks": _load_masks, "csv": _load_csv}


def spec_classes(spec: DatasetSpec) -> list[str]:
    """The class names of a dataset, read without loading its annotations where the format allows."""
    if spec.classes is not None:
        return list(spec.classes)
    if spec.format == "coco":
        return list(coco_categories(spec.annotations).values())
    if spec.format == "voc":
        return voc_class_names(spec.path)
    if spec.format == "yolo":
        names = yolo_class_names(_yolo_labels(spec))
        if not names:
            raise UserError(f"dataset {spec.name!r}: no class names for the YOLO labels", spec.where,
                            "put classes.txt or data.yaml (names:) beside the labels, or give classes: in a datasets file")
        return names
    if spec.format == "severstal":
        from .severstal import SEVERSTAL_CLASSES
        return list(SEVERSTAL_CLASSES)
    if spec.format == "masks":
        return sorted(n for n in mask_class_folders(Path(spec.path)) if n not in FREE_FOLDERS)
    return csv_class_names(spec.annotations)


@functools.lru_cache(maxsize=None)
def _load(spec_key: tuple) -> tuple[list[dict], SkipLog]:
    spec = DatasetSpec(*spec_key)
    skips = SkipLog(strict=spec.strict)
    dicts = LOADERS[spec.format](spec, skips)
    if not dicts:
        raise DatasetError(spec.path, f"dataset {spec.name!r}: no image with annotations in {spec.format} format" +
                           (f" ({skips.summary()})" if skips.counts else ""))
    for i, d in enumerate(sorted(dicts, key=lambda d: d["image_key"]), 1):
        d["image_id"] = i
    return dicts, skips


@functools.lru_cache(maxsize=None)
def _split(spec_key: tuple) -> dict[str, list[dict]]:
    """The seeded split of a dataset, computed once per process (every split's ``get`` shares it)."""
    from .splits import stratified_split

    return stratified_split(_load(spec_key)[0], seed=spec_key[6], ratios=spec_key[5])


def _key(spec: DatasetSpec) -> tuple:
    return (spec.name, spec.format, os.path.abspath(spec.path), os.path.abspath(spec.annotations) if spec.annotations
            else "", tuple(spec.classes) if spec.classes else None, tuple(spec.split) if spec.split else None,
            spec.seed, spec.where, spec.strict)


def _get(spec_key: tuple, split: str | None, name: str, classes: tuple) -> list[dict]:
    import copy

    dicts, skips = _load(spec_key)
    if split is not None:
        dicts = _split(spec_key)[split]
    dicts = copy.deepcopy(dicts)
    logger.info(summary_line(name, dicts, classes, skips))
    return dicts


def register_spec(spec: DatasetSpec) -> list[str]:
    """Register ``spec`` as ``spec.name`` (all images) and, with ``split``, ``<name>_train/_val/_test``;
    return the names. A name already registered is an error (the built-in sets keep their names)."""
    for p, what in ((spec.path, "path"), (spec.annotations, "annotations")):
        if p and not os.path.exists(p):
            raise UserError(f"dataset {spec.name!r}: {what} {p} does not exist", spec.where, "check the path")
    classes = tuple(spec_classes(spec))
    if not classes:
        raise UserError(f"dataset {spec.name!r}: no class found", spec.where, "give the class names")
    names = [spec.name] + ([f"{spec.name}_{s}" for s in SPLITS] if spec.split else [])
    taken = [n for n in names if n in DatasetCatalog.list()]
    if taken:
        raise UserError(f"dataset name {taken[0]!r} is already registered", spec.where, "choose another name")
    key = _key(spec)
    root = os.path.abspath(spec.path)
    for n, split in zip(names, [None] + list(SPLITS)):
        DatasetCatalog.register(n, functools.partial(_get, key, split, n, classes))
        MetadataCatalog.get(n).set(thing_classes=list(classes), evaluator_type="coco", dataset_root=root,
                                   split=split or "all", seed=spec.seed, source_format=spec.format)
    logger.info("registered %s (%s, %d classes: %s)", ", ".join(names), spec.format, len(classes), ", ".join(classes))
    return names


def register_user_datasets(specs: Sequence[str] = (), files: Sequence[str] = (), where: str = "--dataset") -> list[str]:
    """Register every ``NAME=FORMAT:PATH[:ANN]`` in ``specs`` and every dataset of ``files`` (and of
    ``$STEEL_FSD_DATASETS_FILE``); return the names registered. A spec or file seen before in this process is
    not registered twice."""
    env = os.environ.get(FILE_ENV, "")
    out: list[str] = []
    todo = [s for f in list(files) + ([env] if env else []) for s in read_datasets_file(f)]
    todo += [parse_spec(s, where) for s in specs]
    for spec in todo:
        if _key(spec) in _REGISTERED:
            continue
        out += register_spec(spec)
        _REGISTERED.add(_key(spec))
    return out


_REGISTERED: set[tuple] = set()


def register_datasets(root: str | os.PathLike | None = None, specs: Sequence[str] = (),
                      files: Sequence[str] = ()) -> list[str]:
    """What every tool registers: the built-in sets under ``root`` (:func:`~steel_fsd.data.catalog.register_all`)
    and the user's datasets (:func:`register_user_datasets`)."""
    from .catalog import register_all

    return register_all(root) + register_user_datasets(specs, files)


def dataset_name(value: str, where: str = "--dataset") -> str:
    """The dataset a tool's ``--dataset`` names: a registered name as it is, or ``NAME=FORMAT:PATH[:ANN]``
    registered first (once), then its NAME."""
    if "=" not in value:
        return value
    spec = parse_spec(value, where)
    register_user_datasets([value], where=where)
    return spec.name
