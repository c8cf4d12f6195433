"""X-SDD loader (Xsteel surface defect dataset, Feng et al. 2021): class folders to image-level dataset dicts.

Published layout under ``root``: ``datas/<class name>/<n>.jpg`` (``finishing roll printing`` also holds
``.png`` files), class names with spaces (``red iron``). Seven classes of hot-rolled strip defects, 1,360 RGB
images of 128x128 (two of them 122 and 130 pixels wide). There are no boxes and no masks: every dict has
``annotations: []`` and ``image_labels: [class index]`` (its folder's class), for backbone pretraining and
classification probes, not for detection metrics.

Class names are the folder names lower-cased with spaces as underscores (``red iron`` -> ``red_iron``); the
default order (:data:`XSDD_CLASSES`) is the published image count, largest first (ties: alphabetical), so
class ids are stable whatever the file system lists first. Problems go through the
:class:`~steel_fsd.data.errors.SkipLog` (default strict: :class:`DatasetError` naming the path):

* a class folder whose name is not one of ``class_names`` (``unknown class``);
* an image file whose header cannot be read (``unreadable image``);
* two images of one folder with the same stem (``duplicate image``: their keys would collide).

A file without an image extension (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``) or a sub-folder inside ``datas/``
or a class folder is not an image of the set: left out and counted as ``not an image`` (nothing is dropped
silently; ``readme.txt`` beside ``datas/`` is not looked at). Only image headers are read here; the catalog's
full decode checks the pixels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from .errors import DatasetError, SkipLog

#: The seven classes, by published image count (largest first; ties alphabetical): red iron 397, slag
#: inclusion 238, finishing roll printing 203, oxide scale of temperature system 203, surface scratch 134,
#: iron sheet ash 122, oxide scale of plate system 63.
XSDD_CLASSES = ("red_iron", "slag_inclusion", "finishing_roll_printing", "oxide_scale_of_temperature_system",
                "surface_scratch", "iron_sheet_ash", "oxide_scale_of_plate_system")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
DATA_FOLDER = "datas"
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height (read_image applies them)


def class_name(folder: str) -> str:
    """The class name of a class folder: lower-cased, spaces as underscores (``Red iron`` -> ``red_iron``)."""
    return "_".join(folder.strip().lower().split())


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image from its header (EXIF orientation applied, as
    :func:`~steel_fsd.data.images.read_image` does); :class:`DatasetError` naming the file if unreadable."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(_ORIENTATION) in (5, 6, 7, 8):
                w, h = h, w
    except UnidentifiedImageError:
        raise DatasetError(str(path), "not a readable image (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(str(path), f"unreadable image header ({e})") from None
    if w < 1 or h < 1:
        raise DatasetError(str(path), f"empty image ({w}x{h})")
    return int(h), int(w)


def _not_image(skips: SkipLog, path: Path) -> None:
    """Count a file or folder that is not an image of the set (kept as the reason's first example)."""
    skips.note("not an image")
    skips.examples.setdefault("not an image", f"{path}: not an image (expected <class>/<n>{'|'.join(IMAGE_EXTS)})")


def load_xsdd(root: str | os.PathLike, class_names: Sequence[str] = XSDD_CLASSES,
              skips: SkipLog | None = None) -> list[dict]:
    """Load X-SDD under ``root`` (the folder holding ``datas/``) as Detectron2 dataset dicts, sorted by image key.

    One dict per image: ``file_name`` (absolute), ``image_id`` (the sorted keys numbered from 1), ``image_key``
    (``<class folder>/<stem>``, e.g. ``red iron/2001``), ``height``, ``width`` (from the header),
    ``annotations`` (always empty) and ``image_labels`` (``[index of the folder's class in class_names]``).
    A missing or empty ``datas/`` is a :class:`DatasetError` naming it; other problems go through ``skips``
    (see the module docstring).
    """
    skips = SkipLog(strict=True) if skips is None else skips
    data = Path(root) / DATA_FOLDER
    if not data.is_dir():
        raise DatasetError(str(data), "X-SDD folder not found: expected datas/<class name>/<n>.jpg")
    class_index = {n: i for i, n in enumerate(class_names)}
    entries: list[tuple[str, Path, int]] = []
    for folder in sorted(data.iterdir()):
        if not folder.is_dir():
            _not_image(skips, folder)
            continue
        name = class_name(folder.name)
        if name not in class_index:
            skips.problem("unknown class", str(folder), f"{name!r} is not one of {list(class_names)}")
            continue
        stems: dict[str, Path] = {}
        for f in sorted(folder.iterdir()):
            if not f.is_file() or f.suffix.lower() not in IMAGE_EXTS:
                _not_image(skips, f)
                continue
            if f.stem in stems:
                skips.problem("duplicate image", str(f), f"same stem as {stems[f.stem].name}")
                continue
            stems[f.stem] = f
            entries.append((f"{folder.name}/{f.stem}", f, class_index[name]))
    out = []
    for image_id, (key, path, label) in enumerate(sorted(entries), 1):
        try:
            h, w = image_size(path)
        except DatasetError as e:
            skips.problem("unreadable image", e.path, e.cause)
            continue
        out.append({"file_name": os.path.abspath(path), "image_id": image_id, "image_key": key, "height": h,
                    "width": w, "annotations": [], "image_labels": [label]})
    if not out:
        raise DatasetError(str(data), "empty dataset: no <class name>/<n>.jpg image" +
                           (f" ({skips.summary()})" if skips.counts else ""))
    return out
