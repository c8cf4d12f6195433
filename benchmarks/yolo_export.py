"""Detectron2 dataset dicts -> a YOLO-format dataset folder, and back (for bench_yolo.py).

Pure conversion, importable without Ultralytics (tests/test_bench_yolo.py uses it). One PNG per dataset
dict, written from the pixels the project itself trains on (``read_dataset_image``: Severstal tiles are
crops of strips, some ``.jpg`` files are PNG-encoded), so a tile becomes a real image. Labels are YOLO
lines ``class cx cy w h`` normalized to the image size. ``index.json`` maps each image file back to its
dataset dict (``image_id``, ``image_key``), so predictions can be scored against the original dicts.

Layout of ``export_split(dicts, names, root, "train", read)``::

    root/images/train/<image_id>.png   root/labels/train/<image_id>.txt   root/index_train.json
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

# detectron2.structures.BoxMode values (kept literal so this module needs neither detectron2 nor torch)
XYXY_ABS, XYWH_ABS = 0, 1
DECIMALS = 6


def box_xyxy(ann: dict) -> tuple[float, float, float, float]:
    """An annotation's box as absolute ``(x0, y0, x1, y1)`` (BoxMode XYXY_ABS or XYWH_ABS)."""
    mode = int(ann.get("bbox_mode", XYXY_ABS))
    x0, y0, a, b = (float(v) for v in ann["bbox"])
    if mode == XYXY_ABS:
        return x0, y0, a, b
    if mode == XYWH_ABS:
        return x0, y0, x0 + a, y0 + b
    raise ValueError(f"bbox_mode {mode} is not absolute (XYXY_ABS or XYWH_ABS)")


def yolo_line(cls: int, box: Sequence[float], width: int, height: int) -> str | None:
    """``"cls cx cy w h"`` (normalized, clipped to the image), or None for a box with no area inside it."""
    x0, y0, x1, y1 = box
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None
    vals = ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)
    return f"{int(cls)} " + " ".join(f"{v:.{DECIMALS}f}" for v in vals)


def label_lines(d: dict) -> list[str]:
    """YOLO label lines of a dataset dict: its non-crowd boxes, in annotation order (boxes clipped)."""
    w, h = int(d["width"]), int(d["height"])
    lines = []
    for ann in d.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        line = yolo_line(int(ann["category_id"]), box_xyxy(ann), w, h)
        if line is not None:
            lines.append(line)
    return lines


def parse_label_lines(lines: Iterable[str], width: int, height: int) -> list[tuple[int, float, float, float, float]]:
    """YOLO label lines back to ``(cls, x0, y0, x1, y1)`` in absolute pixels (the inverse of :func:`label_lines`)."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        c, cx, cy, bw, bh = line.split()
        cx, cy, bw, bh = float(cx) * width, float(cy) * height, float(bw) * width, float(bh) * height
        out.append((int(c), cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2))
    return out


def image_stem(d: dict) -> str:
    """File stem of a dict's exported image: its ``image_id`` (unique within a dataset, filesystem-safe)."""
    return f"{int(d['image_id']):08d}"


def export_split(dicts: list[dict], class_names: Sequence[str], root: str | os.PathLike, split: str,
                 read_image: Callable[[dict], "object"]) -> dict[str, dict]:
    """Write one split: ``images/<split>/*.png`` (from ``read_image(d)``, a BGR HxWx3 array), the labels and
    ``index_<split>.json``. Returns the index ``{image path: {image_id, image_key, width, height}}``.

    Images without boxes get an empty label file (background images). Existing files are overwritten.
    """
    import cv2  # scoped: the label conversion above needs no image library

    root = Path(root)
    img_dir, lbl_dir = root / "images" / split, root / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, dict] = {}
    for d in dicts:
        stem = image_stem(d)
        path = img_dir / f"{stem}.png"
        if str(path) in index:
            raise ValueError(f"{split}: duplicate image_id {d['image_id']}")
        for ann in d.get("annotations", []):
            if not 0 <= int(ann["category_id"]) < len(class_names):
                raise ValueError(f"{split}: image {d.get('image_key', d['image_id'])}: category_id "
                                 f"{ann['category_id']} outside 0..{len(class_names) - 1}")
        img = read_image(d)
        if img.shape[0] != int(d["height"]) or img.shape[1] != int(d["width"]):
            raise ValueError(f"{d['file_name']}: image is {img.shape[1]}x{img.shape[0]}, dict says "
                             f"{d['width']}x{d['height']}")
        if not cv2.imwrite(str(path), img):
            raise OSError(f"cannot write {path}")
        lines = label_lines(d)
        (lbl_dir / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
        index[str(path)] = {"image_id": d["image_id"], "image_key": str(d.get("image_key", d["image_id"])),
                            "width": int(d["width"]), "height": int(d["height"])}
    (root / f"index_{split}.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def write_data_yaml(root: str | os.PathLike, class_names: Sequence[str], train: str = "train",
                    val: str = "val", file_name: str = "data.yaml") -> Path:
    """``root/<file_name>`` for Ultralytics: absolute ``path``, ``train``/``val`` image folders, ``names``."""
    root = Path(root).resolve()
    names = "\n".join(f"  {i}: {json.dumps(str(n))}" for i, n in enumerate(class_names))
    text = f"path: {json.dumps(str(root))}\ntrain: images/{train}\nval: images/{val}\nnames:\n{names}\n"
    path = root / file_name
    path.write_text(text)
    return path
