"""NEU-DET loader: Pascal VOC XML to Detectron2 dataset dicts.

Two published layouts are accepted under ``root``:

* flat: ``ANNOTATIONS/*.xml`` and ``IMAGES/*.jpg``;
* split: ``{train,validation}/annotations/*.xml`` and ``{train,validation}/images/<class>/*.jpg``.

In both, the images of an annotation folder are searched (recursively) in its sibling images folder
(folder names matched case-insensitively). The XML ``<name>`` is the label, whatever the file is called.
Images are only checked for existence (their header is read only when ``<size>`` is missing).
"""
from __future__ import annotations

import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from detectron2.structures import BoxMode
from PIL import Image

from .errors import DatasetError, SkipLog

NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
_ANNOTATION_DIRS = ("annotations",)
_IMAGE_DIRS = ("images", "jpegimages")
_OBJECT_TAG = re.compile(rb"<!--.*?-->|<object[\s>/]", re.S)

logger = logging.getLogger(__name__)


def _child_dir(parent: Path, names: Sequence[str]) -> Path | None:
    """The sub-folder of ``parent`` whose lower-cased name is in ``names`` (first in sorted order)."""
    if not parent.is_dir():
        return None
    found = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.lower() in names)
    return found[0] if found else None


def annotation_dirs(root: str | os.PathLike) -> list[Path]:
    """The annotation folders of a NEU-DET root: ``root/ANNOTATIONS`` or ``root/<split>/annotations``."""
    root = Path(root)
    flat = _child_dir(root, _ANNOTATION_DIRS)
    if flat is not None:
        return [flat]
    nested = [d for d in (_child_dir(s, _ANNOTATION_DIRS) for s in sorted(root.iterdir()) if s.is_dir())
              if d is not None] if root.is_dir() else []
    if not nested:
        raise DatasetError(str(root), "no NEU-DET annotations: expected ANNOTATIONS/ or "
                                      "{train,validation}/annotations/")
    return nested


def _image_index(images_dir: Path | None) -> dict[str, str]:
    """File name -> path of every image below ``images_dir`` (recursive listing, no decoding)."""
    index: dict[str, str] = {}
    if images_dir is None:
        return index
    for dirpath, dirnames, filenames in os.walk(images_dir):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTS):
                index.setdefault(f, os.path.join(dirpath, f))
    return index


def _image_candidates(filename: str, stem: str) -> list[str]:
    """File names to try for ``<filename>``: as given if it has an image extension, else with each
    extension; then the XML stem with each extension."""
    names = [filename] if filename.lower().endswith(IMAGE_EXTS) else [filename + e for e in IMAGE_EXTS]
    names += [stem + e for e in IMAGE_EXTS]
    return list(dict.fromkeys(n for n in names if n and not n.startswith(".")))


def _object_line(raw: bytes, index: int) -> int | None:
    """1-based line of the ``index``-th ``<object>`` element in the raw XML text (comments skipped)."""
    starts = [m.start() for m in _OBJECT_TAG.finditer(raw) if not m.group().startswith(b"<!--")]
    return raw.count(b"\n", 0, starts[index]) + 1 if index < len(starts) else None


def _nonneg_int(text: str | None) -> int:
    try:
        return max(int(float(text)), 0) if text is not None else 0
    except ValueError:
        return 0


def _read_size(root: ET.Element, image_path: str) -> tuple[int, int]:
    """(height, width) from ``<size>``; from the image header when absent or zero."""
    size = root.find("size")
    h = _nonneg_int(size.findtext("height")) if size is not None else 0
    w = _nonneg_int(size.findtext("width")) if size is not None else 0
    if h and w:
        return h, w
    try:
        with Image.open(image_path) as img:
            w, h = img.size
    except OSError as e:
        raise DatasetError(image_path, f"no <size> in the XML and the image header is unreadable ({e})") from None
    return h, w


def _parse_object(obj: ET.Element, class_index: dict[str, int], height: int, width: int,
                  where: tuple[str, bytes, int], skips: SkipLog) -> dict | None:
    """One ``<object>`` as a Detectron2 annotation, or None when skipped/dropped (counted in ``skips``).

    VOC boxes are 1-based inclusive: ``[xmin-1, ymin-1, xmax, ymax]`` in pixel-edge coordinates.
    Boxes crossing the border are clipped; zero-area boxes are dropped.
    """
    xml_path, raw, index = where
    name = (obj.findtext("name") or "").strip()
    if name not in class_index:
        skips.problem("unknown class", xml_path, f"{name!r} is not one of {sorted(class_index)}",
                      _object_line(raw, index))
        return None
    box = obj.find("bndbox")
    try:
        xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (AttributeError, TypeError, ValueError):
        skips.problem("bad box", xml_path, "<bndbox> needs numeric xmin, ymin, xmax, ymax",
                      _object_line(raw, index))
        return None
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):  # NaN compares False to everything below
        skips.problem("bad box", xml_path, f"non-finite coordinate in xmin, ymin, xmax, ymax = "
                      f"{xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}", _object_line(raw, index))
        return None
    x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax
    if x1 < x0 or y1 < y0:
        skips.problem("inverted box", xml_path, f"xmin..xmax {xmin:g}..{xmax:g}, ymin..ymax {ymin:g}..{ymax:g}",
                      _object_line(raw, index))
        return None
    if x1 == x0 or y1 == y0:
        skips.note("zero-area box")
        logger.warning("%s:%s: dropped zero-area box %s", xml_path, _object_line(raw, index), [x0, y0, x1, y1])
        return None
    if x0 >= width or y0 >= height or x1 <= 0 or y1 <= 0:
        skips.problem("box out of bounds", xml_path, f"box {[x0, y0, x1, y1]} outside the {width}x{height} image",
                      _object_line(raw, index))
        return None
    clipped = [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]
    if clipped != [x0, y0, x1, y1]:
        skips.note("clipped box")
    return {"bbox": clipped, "bbox_mode": BoxMode.XYXY_ABS, "category_id": class_index[name], "iscrowd": 0,
            "difficult": 1 if _nonneg_int(obj.findtext("difficult")) else 0}


def _parse_xml(xml_path: str, image_index: dict[str, str], class_index: dict[str, int],
               skips: SkipLog) -> dict | None:
    """Dataset dict (without ``image_id``) of one VOC file, or None when the file is skipped."""
    try:
        with open(xml_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        skips.problem("unreadable XML", xml_path, e.strerror or str(e))
        return None
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        skips.problem("malformed XML", xml_path, str(e), e.position[0])
        return None
    stem = Path(xml_path).stem
    filename = (root.findtext("filename") or "").strip()
    image_path = next((image_index[n] for n in _image_candidates(filename, stem) if n in image_index), None)
    if image_path is None:
        skips.problem("missing image", xml_path, f"no image file for <filename> {filename!r} "
                                                 f"(tried {', '.join(IMAGE_EXTS)} and the XML name)")
        return None
    try:
        height, width = _read_size(root, image_path)
    except DatasetError as e:
        skips.problem("missing size", xml_path, str(e))
        return None
    anns = [_parse_object(obj, class_index, height, width, (xml_path, raw, i), skips)
            for i, obj in enumerate(root.iter("object"))]
    return {"file_name": os.path.abspath(image_path), "image_key": stem, "height": height, "width": width,
            "annotations": [a for a in anns if a is not None]}


def load_neu_voc(root: str | os.PathLike, class_names: Sequence[str] = NEU_CLASSES,
                 skips: SkipLog | None = None, files: list[str] | None = None) -> list[dict]:
    """Load NEU-DET VOC annotations under ``root`` as Detectron2 dataset dicts, sorted by image key.

    ``files`` restricts loading to these XML files (paths, relative ones resolved against ``root``);
    their images are searched in the images folder next to each file's folder. ``image_key`` is the
    XML file stem and ``image_id`` numbers the sorted keys of all XML files considered from 1 (so ids
    do not move when a bad file is skipped). Problems go through ``skips`` (default: strict, raising
    :class:`DatasetError` with file and line); clipped and zero-area boxes are counted as notes.
    """
    skips = SkipLog(strict=True) if skips is None else skips
    root = Path(root)
    if files is None:
        xml_files = [str(p) for d in annotation_dirs(root) for p in d.iterdir() if p.suffix.lower() == ".xml"]
    else:
        xml_files = [str(p if Path(p).is_absolute() else root / p) for p in files]
    xml_files.sort(key=lambda p: (Path(p).stem, p))
    class_index = {n: i for i, n in enumerate(class_names)}
    indexes: dict[Path, dict[str, str]] = {}
    out: list[dict] = []
    seen: dict[str, str] = {}
    for image_id, xml_path in enumerate(xml_files, 1):
        stem = Path(xml_path).stem
        if stem in seen:
            skips.problem("duplicate image key", xml_path, f"{stem!r} already loaded from {seen[stem]}")
            continue
        seen[stem] = xml_path
        split_dir = Path(xml_path).parent.parent
        if split_dir not in indexes:
            indexes[split_dir] = _image_index(_child_dir(split_dir, _IMAGE_DIRS))
        d = _parse_xml(xml_path, indexes[split_dir], class_index, skips)
        if d is not None:
            d["image_id"] = image_id
            out.append(d)
    if not out:
        raise DatasetError(str(root), "empty dataset: no usable VOC annotation (.xml) found under ANNOTATIONS/ or "
                           "{train,validation}/annotations/" + (f" ({skips.summary()})" if skips.counts else ""))
    return out
