"""Few-shot support: which boxes are the K supports per class (seeded sampling), the one K-shot manifest
format (canonical JSON) with its writer and reader, and hand-written support lists converted into it.

A manifest is a pure function of the dataset dicts, the class names, K and the seed: the boxes are
chosen by :func:`sample_support`, so a manifest and ``tools/register_support.py`` with the same (K, seed)
pick the same boxes. It holds no timestamps or absolute paths, and :func:`write_manifest` writes it
byte-identically for equal content. Every path from a manifest (or a hand-written list, through
:func:`entries_from_list`) to support images goes through :func:`manifest_support_dicts`.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import logging

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..data.catalog import summary_line
from ..data.subsets import register_derived
from ..utils.io import file_sha256, read_json, write_json

logger = logging.getLogger("steel_fsd")

FORMAT = "steel_fsd.kshot_manifest"
VERSION = 1
RULE = ("K counts instances (boxes) per class, not images. Per class, the candidates are its non-crowd boxes "
        "sorted by (image_key, annotation index); K of them are drawn without replacement by one "
        "numpy.random.default_rng(seed) used for the classes in class-id order "
        "(steel_fsd.fewshot.support.sample_support). An image may give several boxes of a class; only the "
        "sampled boxes are supports, its other boxes are not used (unless sampled for their own class). A class "
        "with fewer than K instances uses all of them and records the shortfall in counts.")
REQUIRED = {"format": str, "version": int, "dataset": str, "class_names": list, "shots": int, "seed": int,
            "rule": str, "source_sha256": str, "counts": dict, "supports": list}
ENTRY_FIELDS = {"class": str, "category_id": int, "image_key": str, "annotation_index": int, "bbox": list,
                "bbox_mode": str}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _key(d: dict) -> str:
    """An image's key, as :func:`sample_support` sorts by it."""
    return str(d.get("image_key", d["image_id"]))


def sample_support(dataset_dicts: list[dict], num_classes: int, shots: int, seed: int) -> list[tuple[dict, int]]:
    """K annotated instances per class, seeded: ``[(dataset_dict, annotation_index), ...]``.

    K counts instances (boxes), not images. Candidates are sorted by (image_key or image_id, box
    index) before a seeded draw without replacement, so the result depends only on the data and the
    seed. An image with several boxes of a class may contribute several of them; its other boxes are
    not used. Classes with fewer than K instances use all they have.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    rng = np.random.default_rng(seed)
    ordered = sorted(dataset_dicts, key=_key)
    picks = []
    for c in range(num_classes):
        cands = [(d, i) for d in ordered for i, a in enumerate(d.get("annotations", []))
                 if a["category_id"] == c and not a.get("iscrowd", 0)]
        if not cands:
            raise ValueError(f"class {c} has no annotated instance to use as support")
        chosen = rng.choice(len(cands), size=min(shots, len(cands)), replace=False)
        picks += [cands[j] for j in sorted(chosen)]
    return picks


def _available(dataset_dicts: list[dict], num_classes: int) -> Counter:
    """Candidate instances per class id: non-crowd boxes (the filter of :func:`sample_support`)."""
    return Counter(int(a["category_id"]) for d in dataset_dicts for a in d.get("annotations", [])
                   if not a.get("iscrowd", 0) and 0 <= int(a["category_id"]) < num_classes)


def annotation_sources(root: str | os.PathLike) -> list[Path]:
    """The annotation files a dataset root is loaded from (the same files tools/prepare_datasets.py digests).

    Severstal: the one CSV its loader reads (``train.csv`` if present, else ``train_v2.csv``); magnetic tile:
    the mask PNGs of its ``MT_*/Imgs`` folders; otherwise NEU: the XML files of its annotation folders.
    """
    from ..data.magnetic_tile import FOLDER_PREFIX, mask_files
    from ..data.neu import annotation_dirs
    from ..data.severstal import CSV_NAMES

    root = Path(root)
    csv = next((root / n for n in CSV_NAMES if (root / n).is_file()), None)
    if csv is not None:
        return [csv]
    if any(p.is_dir() and p.name.startswith(FOLDER_PREFIX) for p in root.iterdir()):
        return mask_files(root)
    return sorted(p for d in annotation_dirs(root) for p in d.iterdir() if p.suffix.lower() == ".xml")


def kshot_manifest(dataset_dicts: list[dict], class_names: Sequence[str], shots: int, seed: int,
                   source_sha256: str, dataset_name: str) -> dict:
    """The K-shot support manifest of ``dataset_dicts`` (see :data:`RULE`), JSON-ready.

    ``supports`` lists ``{class, category_id, image_key, annotation_index, bbox, bbox_mode}`` in class
    order, then (image_key, annotation index) order; ``counts[class]`` gives the ``available``,
    ``selected`` and ``shortfall`` (K - selected) instances. Raises ValueError when a class has no instance.
    """
    if int(shots) < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if not _SHA256.fullmatch(str(source_sha256)):
        raise ValueError(f"source_sha256 must be 64 lowercase hex digits, got {source_sha256!r}")
    names = [str(c) for c in class_names]
    available = _available(dataset_dicts, len(names))
    empty = [names[c] for c in range(len(names)) if not available[c]]
    if empty:
        raise ValueError(f"{dataset_name}: classes {empty} have no annotated instance to use as support")
    supports = []
    for d, i in sample_support(dataset_dicts, len(names), int(shots), int(seed)):
        a = d["annotations"][i]
        supports.append({"class": names[a["category_id"]], "category_id": int(a["category_id"]),
                         "image_key": _key(d), "annotation_index": int(i),
                         "bbox": [float(v) for v in a["bbox"]], "bbox_mode": BoxMode(a["bbox_mode"]).name})
    selected = Counter(e["category_id"] for e in supports)
    counts = {names[c]: {"available": available[c], "selected": selected[c], "shortfall": int(shots) - selected[c]}
              for c in range(len(names))}
    return {"format": FORMAT, "version": VERSION, "dataset": str(dataset_name), "class_names": names,
            "shots": int(shots), "seed": int(seed), "rule": RULE, "source_sha256": str(source_sha256),
            "counts": counts, "supports": supports}


def _fail(path: str, msg: str) -> None:
    raise ValueError(f"{path}: invalid K-shot manifest: {msg}")


def validate_manifest(m: object, path: str = "manifest") -> dict:
    """Check fields, types and internal consistency (entries vs counts vs K); ValueError naming ``path``."""
    if not isinstance(m, dict):
        _fail(path, f"expected a JSON object, got {type(m).__name__}")
    if m.get("format") != FORMAT:
        _fail(path, f"format is {m.get('format')!r}, expected {FORMAT!r}")
    for field, kind in REQUIRED.items():
        if field not in m:
            _fail(path, f"missing field {field!r}")
        if not isinstance(m[field], kind) or (kind is int and isinstance(m[field], bool)):
            _fail(path, f"field {field!r} should be {kind.__name__}, got {type(m[field]).__name__}")
    if m["version"] != VERSION:
        _fail(path, f"version {m['version']}, this code reads {VERSION}")
    names, shots = m["class_names"], m["shots"]
    if shots < 1 or not _SHA256.fullmatch(m["source_sha256"]):
        _fail(path, f"shots {shots} < 1 or source_sha256 {m['source_sha256']!r} is not a sha256 hex digest")
    for n, e in enumerate(m["supports"]):
        bad = [f for f, kind in ENTRY_FIELDS.items() if not isinstance(e, dict) or not isinstance(e.get(f), kind)]
        if bad or len(e["bbox"]) != 4 or e["class"] not in names or names.index(e["class"]) != e["category_id"]:
            _fail(path, f"supports[{n}] is malformed (bad fields {bad or 'class/category_id/bbox'}): {e!r}")
    selected = Counter(e["class"] for e in m["supports"])
    if sorted(m["counts"]) != sorted(names):
        _fail(path, f"counts name {sorted(m['counts'])}, class_names are {names}")
    for c in names:
        cnt = m["counts"][c]
        want = {"available": cnt.get("available"), "selected": selected[c],
                "shortfall": shots - selected[c]} if isinstance(cnt, dict) else None
        if cnt != want or not isinstance(cnt["available"], int) or selected[c] != min(shots, cnt["available"]):
            _fail(path, f"class {c!r}: counts {cnt!r} disagree with its {selected[c]} support entries and K={shots}")
    if len({(e["image_key"], e["annotation_index"]) for e in m["supports"]}) != len(m["supports"]):
        _fail(path, "a box is listed twice")
    return m


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """Validate and write ``manifest`` as canonical JSON (sorted keys, indent 1, trailing newline), atomically."""
    validate_manifest(manifest, str(path))
    write_json(path, manifest)


def load_manifest(path: str | os.PathLike) -> dict:
    """Read and validate a manifest; ValueError naming the file when it is unreadable, truncated or inconsistent."""
    return validate_manifest(read_json(path, "K-shot manifest"), str(path))


def source_image(key: str) -> str:
    """The image a key comes from: Severstal tile keys ``<strip>@<x0>[,<y0>]`` map to ``<strip>``."""
    return key.split("@", 1)[0]


def assert_disjoint(manifest: dict, eval_dicts: list[dict]) -> None:
    """Raise ValueError naming the support images that also appear in ``eval_dicts``.

    Images are compared by :func:`source_image`, so a tile and its whole strip count as the same image.
    """
    support = {source_image(e["image_key"]) for e in manifest["supports"]}
    overlap = sorted(support & {source_image(_key(d)) for d in eval_dicts})
    if overlap:
        raise ValueError(f"{manifest['dataset']} K={manifest['shots']} seed={manifest['seed']}: {len(overlap)} support "
                         f"images are in the evaluation split: {overlap[:20]}{' ...' if len(overlap) > 20 else ''}")


def entries_from_list(entries: object, dataset_dicts: list[dict], class_names: Sequence[str],
                      path: str = "support list") -> list[dict]:
    """A hand-written support list ``[{image_key[, bbox]}, ...]`` as manifest ``supports`` entries.

    An entry with ``bbox`` (XYWH or the dataset's box mode, matched to 2 decimals) names that box; one
    without names every box of the image. Raises ValueError naming ``path`` and the entry that is malformed,
    names an image not in the dataset or a box the image does not have.
    """
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{image_key[, bbox]}}, got {type(entries).__name__}")
    by_key = {_key(d): d for d in dataset_dicts}
    out, seen = [], set()
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image_key" not in entry:
            raise ValueError(f"{path}: entry {n}: expected {{image_key[, bbox]}}, got {entry!r}")
        key = str(entry["image_key"])
        if key not in by_key:
            raise ValueError(f"{path}: entry {n}: image_key '{key}' is not in the dataset")
        anns = by_key[key].get("annotations", [])
        if "bbox" in entry:
            want = [round(float(v), 2) for v in entry["bbox"]]
            idx = [i for i, a in enumerate(anns) if [round(float(v), 2) for v in a["bbox"]] == want][:1]
            if not idx:
                raise ValueError(f"{path}: entry {n}: no box {entry['bbox']} in image '{key}'")
        else:
            idx = list(range(len(anns)))
        for i in idx:
            if (key, i) in seen:
                continue
            seen.add((key, i))
            a = anns[i]
            out.append({"class": str(class_names[a["category_id"]]), "category_id": int(a["category_id"]),
                        "image_key": key, "annotation_index": i, "bbox": [float(v) for v in a["bbox"]],
                        "bbox_mode": BoxMode(a["bbox_mode"]).name})
    return out


def manifest_support_dicts(manifest: dict, dataset_dicts: list[dict]) -> list[dict]:
    """The dicts of the manifest's images, each with only its manifest boxes (original order), by image_key.

    ``manifest`` is a K-shot manifest or ``{"supports": entries}`` (e.g. from :func:`entries_from_list`).
    Raises ValueError naming every support image missing from ``dataset_dicts`` and every box that is
    not there (index out of range, or a different bbox/class at that index).
    """
    by_key = {_key(d): d for d in dataset_dicts}
    wanted: dict[str, list[dict]] = {}
    for e in manifest["supports"]:
        wanted.setdefault(e["image_key"], []).append(e)
    missing_images = sorted(k for k in wanted if k not in by_key)
    missing_boxes = []
    out = []
    for k in sorted(set(wanted) - set(missing_images)):
        anns = by_key[k].get("annotations", [])
        for e in wanted[k]:
            i = e["annotation_index"]
            a = anns[i] if 0 <= i < len(anns) else None
            if a is None or [float(v) for v in a["bbox"]] != [float(v) for v in e["bbox"]] \
                    or int(a["category_id"]) != e["category_id"]:
                missing_boxes.append(f"{k}[{i}] {e['class']} {e['bbox']}")
        keep = sorted(e["annotation_index"] for e in wanted[k])
        out.append(dict(by_key[k], annotations=[anns[i] for i in keep if 0 <= i < len(anns)]))
    if missing_images or missing_boxes:
        where = (f"{manifest['dataset']} K={manifest['shots']} seed={manifest['seed']}" if "dataset" in manifest
                 else "support list")
        raise ValueError(f"{where}: support images not in the dataset: {missing_images}; support boxes not found: "
                         f"{missing_boxes}")
    return out


def register_manifest(name: str, parent: str, manifest_path: str | Path) -> dict:
    """Register the support boxes of a K-shot manifest (tools/prepare_fewshot.py) drawn from ``parent`` as ``name``.

    Each image keeps only its manifest boxes (see :func:`manifest_support_dicts`).
    Returns the manifest. Raises ValueError when the manifest was drawn from another class list.
    """
    manifest = load_manifest(manifest_path)
    classes = list(MetadataCatalog.get(parent).thing_classes)
    if manifest["class_names"] != classes:
        raise ValueError(f"{manifest_path}: manifest classes {manifest['class_names']} != {parent}'s {classes}")
    digest = file_sha256(manifest_path)

    def load() -> list[dict]:
        dicts = manifest_support_dicts(manifest, DatasetCatalog.get(parent))
        logger.info(summary_line(name, dicts, classes))
        return dicts

    register_derived(name, load, parent, classes, manifest=str(manifest_path), manifest_sha256=digest,
              shots=manifest["shots"], seed=manifest["seed"])
    return manifest
