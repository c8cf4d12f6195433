"""Severstal steel defect loader: run-length-encoded masks in a CSV to Detectron2 dataset dicts.

Each connected component (8-connectivity) of a class mask becomes one instance with a tight box and
its polygons. Images are never opened: every Severstal image is 256x1600, the RLE shape.

Negatives (images without defects). The original ``train.csv`` (header ``ImageId_ClassId``) lists
every image, four rows each, empty ``EncodedPixels`` meaning "no defect of that class": it is the
image list, and image files absent from it are ignored (counted as ``image not in csv``). The later
``train_v2.csv`` (header ``ImageId,ClassId``) lists defective images only, so with it the images
folder is the source of the negatives: every image file there not in the CSV is a negative.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from detectron2.structures import BoxMode

from .errors import DatasetError, SkipLog
from .rle import SEVERSTAL_SHAPE, Component, RLEError, mask_components, rle_decode

SEVERSTAL_CLASSES = ("defect_1", "defect_2", "defect_3", "defect_4")
CSV_NAMES = ("train.csv", "train_v2.csv")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_HEADERS = {("ImageId_ClassId", "EncodedPixels"): "v1", ("ImageId", "ClassId", "EncodedPixels"): "v2"}

logger = logging.getLogger(__name__)

Rows = dict[str, list[tuple[int, str, int]]]


def _read_csv(csv_path: str, skips: SkipLog) -> tuple[Rows, str]:
    """Rows of a Severstal CSV by ImageId, and the header kind (``"v1"`` or ``"v2"``)."""
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = tuple(h.strip().lstrip("\ufeff") for h in next(reader, []))
        kind = _HEADERS.get(header)
        if kind is None:
            expected = " or ".join(repr(",".join(h)) for h in _HEADERS)
            raise DatasetError(csv_path, f"unexpected header {','.join(header)!r}; expected {expected}", line=1)
        rows: Rows = {}
        seen: dict[tuple[str, int], tuple[str, int]] = {}  # (image, class) -> (rle, line) of its first row
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                skips.problem("bad csv row", csv_path, f"{len(row)} fields, expected {len(header)}", line)
                continue
            if kind == "v1":
                image_id, _, cls = row[0].strip().rpartition("_")
            else:
                image_id, cls = row[0].strip(), row[1].strip()
            try:
                class_id = int(cls)
            except ValueError:
                skips.problem("bad csv row", csv_path, f"class id {cls!r} is not an integer", line)
                continue
            if not image_id:
                skips.problem("bad csv row", csv_path, f"no image id in {row[0]!r}", line)
                continue
            rle = row[-1].strip()
            first = seen.setdefault((image_id, class_id), (rle, line))
            if first[1] != line:  # the Kaggle files list each (image, class) once
                if first[0] == rle:
                    skips.note("duplicate csv row")
                    if skips.counts["duplicate csv row"] == 1:
                        logger.warning("%s:%d: duplicate of line %d (%s class %d): skipped, counted as "
                                       "'duplicate csv row'", csv_path, line, first[1], image_id, class_id)
                else:
                    skips.problem("conflicting csv rows", csv_path,
                                  f"{image_id} class {class_id} has another mask at line {first[1]}", line)
                continue
            entries = rows.setdefault(image_id, [])
            if rle:
                entries.append((class_id, rle, line))
    return rows, kind


def read_severstal_csv(csv_path: str | os.PathLike, skips: SkipLog | None = None) -> Rows:
    """``{ImageId: [(class_id, rle, csv_line), ...]}`` from ``train.csv`` or ``train_v2.csv``.

    Both headers are accepted (``ImageId_ClassId,EncodedPixels`` with ``"<img>.jpg_<cls>"`` keys, and
    ``ImageId,ClassId,EncodedPixels``). Rows with an empty mask add the image with no entry for that
    class. A wrong header raises :class:`DatasetError` at line 1; bad rows go through ``skips``
    (default strict: raise with the CSV line).
    """
    return _read_csv(str(csv_path), SkipLog(strict=True) if skips is None else skips)[0]


def _shift(c: Component, dx: int, dy: int) -> Component:
    x0, y0, x1, y1 = c.bbox
    polys = [[v + (dx if i % 2 == 0 else dy) for i, v in enumerate(p)] for p in c.polygons]
    return Component([x0 + dx, y0 + dy, x1 + dx, y1 + dy], polys, c.area)


def components(mask: np.ndarray, min_area: int = 0) -> tuple[list[Component], int]:
    """The components of :func:`mask_components` (ordered by column band) and how many fell below ``min_area``.

    No component crosses an empty column, so each run of non-empty columns is labelled on its own,
    cropped to its rows: on a sparse 1600-wide strip this touches a small part of the image.
    """
    col_any = np.concatenate([[False], mask.any(axis=0), [False]])
    edges = np.flatnonzero(col_any[1:] != col_any[:-1])
    comps: list[Component] = []
    for x0, x1 in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        band = mask[:, x0:x1]
        rows = np.flatnonzero(band.any(axis=1))
        y0 = int(rows[0])
        comps += [_shift(c, x0, y0) for c in mask_components(band[y0:rows[-1] + 1])]
    kept = [c for c in comps if c.area >= min_area]
    return kept, len(comps) - len(kept)


def _annotations(masks: list[tuple[int, np.ndarray]], min_area: int) -> tuple[list[dict], int]:
    """One annotation per component of each ``(category_id, mask)``; and the number dropped."""
    anns, dropped = [], 0
    for category_id, mask in masks:
        comps, n = components(mask, min_area)
        dropped += n
        anns += [{"bbox": c.bbox, "bbox_mode": BoxMode.XYXY_ABS, "category_id": category_id, "iscrowd": 0,
                  "segmentation": c.polygons} for c in comps]
    return anns, dropped


def _find_csv(root: Path, csv_name: str | None) -> Path:
    if csv_name is not None:
        return root / csv_name
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    raise DatasetError(str(root), f"no Severstal annotations: expected one of {', '.join(CSV_NAMES)}")


def load_severstal(root: str | os.PathLike, class_names: Sequence[str] = SEVERSTAL_CLASSES, min_area: int = 0,
                   skips: SkipLog | None = None, image_dir: str = "train_images",
                   csv_name: str | None = None) -> list[dict]:
    """Load Severstal annotations under ``root`` as Detectron2 dataset dicts, sorted by image key.

    The CSV is ``csv_name`` or else ``train.csv``, else ``train_v2.csv``; images are in ``image_dir``
    (see the module docstring for how negatives are found). ``image_key`` is the ImageId stem and
    ``image_id`` numbers the sorted keys from 1. Components below ``min_area`` pixels are dropped and
    counted (note ``small component``). A bad RLE, an unknown class id or a missing image file skips
    the image through ``skips`` (default strict: :class:`DatasetError` naming the CSV file and line).
    Each dict keeps its masks as ``_rles`` ``[(category_id, rle), ...]`` for :func:`tile_dataset_dicts`.
    """
    skips = SkipLog(strict=True) if skips is None else skips
    root = Path(root)
    csv_path = _find_csv(root, csv_name)
    rows, kind = _read_csv(str(csv_path), skips)
    images_dir = root / image_dir
    files = {f for f in os.listdir(images_dir) if f.lower().endswith(IMAGE_EXTS)} if images_dir.is_dir() else set()
    extra = files - rows.keys()
    if kind == "v1":
        if extra:
            skips.note("image not in csv", len(extra))
        extra = set()
    height, width = SEVERSTAL_SHAPE
    out = []
    for image_id, name in enumerate(sorted(rows.keys() | extra, key=lambda n: (Path(n).stem, n)), 1):
        path = images_dir / name
        if name not in files:
            skips.problem("missing image", str(path), f"listed in {csv_path}")
            continue
        masks, rles = [], []
        for class_id, rle, line in rows.get(name, []):
            if not 1 <= class_id <= len(class_names):
                skips.problem("unknown class", str(csv_path), f"ClassId {class_id} not in 1..{len(class_names)}", line)
                break
            try:
                masks.append((class_id - 1, rle_decode(rle, SEVERSTAL_SHAPE)))
            except RLEError as e:
                skips.problem("bad RLE", str(csv_path), f"{name} class {class_id}: {e}", line)
                break
            rles.append((class_id - 1, rle))
        else:
            anns, dropped = _annotations(masks, min_area)
            if dropped:
                skips.note("small component", dropped)
            out.append({"file_name": os.path.abspath(path), "image_id": image_id, "image_key": Path(name).stem,
                        "height": height, "width": width, "annotations": anns, "_rles": rles})
    if not out:
        raise DatasetError(str(csv_path), "empty dataset: no usable image listed" +
                           (f" ({skips.summary()})" if skips.counts else ""))
    return out


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``min(tile, length)`` covering ``[0, length)``: stride
    ``tile - overlap``, the last tile aligned to the end."""
    if tile <= overlap or overlap < 0:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def tile_dataset_dicts(dicts: list[dict], tile: int = 256, overlap: int = 32, min_area: int = 0,
                       skips: SkipLog | None = None) -> list[dict]:
    """Split each image (dicts from :func:`load_severstal`) into overlapping square tiles.

    Tiles of ``tile`` pixels (capped at the image size) cover the whole image, the last one in each
    direction aligned to the edge (see :func:`tile_positions`). Each tile dict has ``crop_box``
    ``[x0, y0, x1, y1]``, its own ``height``/``width``, ``image_id = parent_id * 1000 + tile_index``,
    ``image_key = "<key>@<x0>"`` (``"<key>@<x0>,<y0>"`` when there are several rows of tiles) and
    annotations recomputed from the masks cropped to the tile (exact boxes; polygons in tile
    coordinates). Tile components below ``min_area`` pixels are dropped and counted in ``skips``
    (note ``small tile component``). Tiles without defects are kept as negatives. ``_rles`` is not
    copied to the tiles.
    """
    out = []
    for d in dicts:
        if "_rles" not in d:
            raise ValueError(f"{d.get('file_name')}: tile_dataset_dicts needs the masks ('_rles') "
                             "kept by load_severstal")
        h, w = int(d["height"]), int(d["width"])
        masks = [(c, rle_decode(rle, (h, w))) for c, rle in d["_rles"]]
        ys, xs = tile_positions(h, tile, overlap), tile_positions(w, tile, overlap)
        if len(ys) * len(xs) > 1000:
            raise ValueError(f"{d['file_name']}: {len(ys) * len(xs)} tiles do not fit image_id = parent * 1000 + i")
        th, tw = min(tile, h), min(tile, w)
        base = {k: v for k, v in d.items() if k not in ("_rles", "annotations")}
        for i, (y0, x0) in enumerate((y, x) for y in ys for x in xs):
            anns, dropped = _annotations([(c, m[y0:y0 + th, x0:x0 + tw]) for c, m in masks], min_area)
            if dropped and skips is not None:
                skips.note("small tile component", dropped)
            key = f"{d['image_key']}@{x0}" if len(ys) == 1 else f"{d['image_key']}@{x0},{y0}"
            out.append(dict(base, crop_box=[x0, y0, x0 + tw, y0 + th], height=th, width=tw,
                            image_id=int(d["image_id"]) * 1000 + i, image_key=key, annotations=anns))
    return out
