"""Magnetic tile defect loader (Huang et al., The Visual Computer 2020): pixel-mask PNGs to Detectron2 dicts.

Published layout under ``root``: ``MT_<Class>/Imgs/<name>.jpg`` with a mask ``<name>.png`` of the same size
beside each image. Classes are the folder names (``MT_Blowhole`` -> ``blowhole``); ``MT_Free`` holds
defect-free images (all-zero masks), loaded as negatives (no annotation), which is what image-level false-alarm
rates are measured on.

Masks are not strictly binary (they were compressed once: values 1-254 along edges), so a pixel is defect when
its value is at least :data:`MASK_THRESHOLD` (128). Each 8-connected component of the thresholded mask becomes
one instance of the folder's class, with its tight box (pixel edges) and polygons (the component's outer
contours, as the Severstal loader writes them). Rules that drop something, each counted in the
:class:`~steel_fsd.data.errors.SkipLog` (nothing is dropped silently):

* components of fewer than :data:`MIN_AREA` (10) pixels are compression specks, not defects: dropped, counted
  as ``small component`` (the published set has 18 of 1-9 pixels; its smallest real blowhole has 26);
* a defect image whose thresholded mask is empty cannot be located: left out, counted as ``empty mask`` (it is
  neither a located defect nor a defect-free negative);
* a defect pixel in an ``MT_Free`` mask, a missing mask, a mask that is not 8-bit single-channel or not the
  image's size, and
  an ``MT_*`` folder that is not a known class are problems (strict: an error naming the file).

Only the masks are decoded here; the images are checked by the catalog's full decode (size against the mask).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from detectron2.structures import BoxMode
from PIL import Image

from .errors import DatasetError, SkipLog
from .severstal import components

MT_CLASSES = ("blowhole", "break", "crack", "fray", "uneven")
FREE = "free"  # MT_Free: defect-free images
MASK_THRESHOLD = 128
MIN_AREA = 10
IMAGE_EXTS = (".jpg", ".jpeg", ".bmp")  # .png beside them are the masks
FOLDER_PREFIX = "MT_"


def class_folders(root: str | os.PathLike) -> dict[str, Path]:
    """``{lower-cased class name: MT_<Class> folder}`` of every ``MT_*`` folder under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(str(root), "magnetic-tile folder not found")
    found = {p.name[len(FOLDER_PREFIX):].lower(): p for p in sorted(root.iterdir())
             if p.is_dir() and p.name.startswith(FOLDER_PREFIX)}
    if not found:
        raise DatasetError(str(root), "no magnetic-tile class folders: expected MT_<Class>/Imgs/")
    return found


def mask_files(root: str | os.PathLike) -> list[Path]:
    """The mask PNGs of every ``MT_*/Imgs`` folder under ``root`` (the set's annotation files), sorted."""
    return sorted(p for folder in class_folders(root).values() if (folder / "Imgs").is_dir()
                  for p in (folder / "Imgs").iterdir() if p.suffix.lower() == ".png")


def read_mask(path: str | os.PathLike, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """A mask PNG as a boolean (H, W) array, ``value >= threshold``; :class:`DatasetError` naming the file if it
    cannot be read or is not a single-channel image."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "1", "P"):
                raise DatasetError(str(path), f"mask must be an 8-bit single-channel image, got mode {img.mode}")
            arr = np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise DatasetError(str(path), "mask file not found") from None
    except OSError as e:
        raise DatasetError(str(path), f"unreadable mask ({e})") from None
    return arr >= threshold


def mask_annotations(mask: np.ndarray, category_id: int, min_area: int = MIN_AREA) -> tuple[list[dict], int]:
    """One annotation per 8-connected component of ``mask`` with at least ``min_area`` pixels (box, polygons,
    ``area`` in pixels); and how many components were smaller."""
    kept, dropped = components(mask, min_area)
    anns = [{"bbox": c.bbox, "bbox_mode": BoxMode.XYXY_ABS, "category_id": category_id, "iscrowd": 0,
             "segmentation": c.polygons, "area": float(c.area)} for c in kept]
    return anns, dropped


def image_instances(mask_path: Path, category_id: int | None, skips: SkipLog, threshold: int = MASK_THRESHOLD,
                    min_area: int = MIN_AREA) -> tuple[np.ndarray, list[dict]] | None:
    """The mask beside an image and its instances (``category_id`` None: a defect-free image, whose mask must be
    empty), or None when the image is left out (each reason counted in ``skips``)."""
    try:
        mask = read_mask(mask_path, threshold)
    except DatasetError as e:
        skips.problem("missing mask" if not mask_path.exists() else "bad mask", e.path, e.cause)
        return None
    if category_id is None:
        if mask.any():
            skips.problem("defect in a defect-free mask", str(mask_path),
                          f"{int(mask.sum())} pixels >= {threshold} in a defect-free image's mask")
            return None
        return mask, []
    anns, small = mask_annotations(mask, category_id, min_area)
    if small:
        skips.note("small component", small)
    if not anns:
        skips.note("empty mask")
        return None
    return mask, anns


def load_magnetic_tile(root: str | os.PathLike, class_names: Sequence[str] = MT_CLASSES,
                       skips: SkipLog | None = None, min_area: int = MIN_AREA,
                       threshold: int = MASK_THRESHOLD) -> list[dict]:
    """Load the magnetic-tile set under ``root`` as Detectron2 dataset dicts, sorted by image key.

    ``image_key`` is ``<Class folder>/<stem>`` (e.g. ``MT_Crack/exp1_num_4409``), ``image_id`` numbers the sorted
    keys from 1; ``MT_Free`` images come with no annotation. See the module docstring for the thresholding and
    the counted drops; problems go through ``skips`` (default strict: :class:`DatasetError` naming the file).
    """
    skips = SkipLog(strict=True) if skips is None else skips
    class_index = {n: i for i, n in enumerate(class_names)}
    entries: list[tuple[str, Path, int | None]] = []  # (key, image path, category id or None for MT_Free)
    for name, folder in class_folders(root).items():
        if name != FREE and name not in class_index:
            skips.problem("unknown class", str(folder), f"{folder.name} is not one of MT_Free or MT_<{'|'.join(class_names)}>")
            continue
        imgs = folder / "Imgs"
        if not imgs.is_dir():
            skips.problem("missing folder", str(imgs), "expected the images and masks in Imgs/")
            continue
        for f in sorted(imgs.iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                entries.append((f"{folder.name}/{f.stem}", f, None if name == FREE else class_index[name]))
    out = []
    for image_id, (key, image, category_id) in enumerate(sorted(entries), 1):
        mask_path = image.with_suffix(".png")
        found = image_instances(mask_path, category_id, skips, threshold, min_area)
        if found is None:
            continue
        mask, anns = found
        h, w = mask.shape
        out.append({"file_name": os.path.abspath(image), "image_id": image_id, "image_key": key, "height": int(h),
                    "width": int(w), "annotations": anns, "mask_file": os.path.abspath(mask_path)})
    if not out:
        raise DatasetError(str(root), "empty dataset: no usable MT_<Class>/Imgs/<name>.jpg with its .png mask" +
                           (f" ({skips.summary()})" if skips.counts else ""))
    return out

