"""Seeded, class-stratified train/val/test splits and a manifest that pins them down.

The split is a pure function of the annotations and the seed (see :func:`stratified_split`); the
manifest (:func:`split_manifest`) records the image keys per split, per-class counts, the seed, the
ratios and a digest of the annotation source files, and :func:`verify_manifest` recomputes the split
to check that the data on disk still gives the recorded one.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..utils.io import file_sha256

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.7, 0.15, 0.15)
SPLIT_METHOD = "stratified-rarest-class-v1"
NEGATIVE = -1  # stratum key of images without boxes (or image labels)


def _normalized(ratios: Sequence[float]) -> np.ndarray:
    r = np.asarray(ratios, dtype=np.float64)
    if r.shape != (len(SPLITS),) or not np.isfinite(r).all() or (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"ratios must be {len(SPLITS)} non-negative numbers with a positive sum, got {ratios!r}")
    return r / r.sum()


def _sorted_by_key(dicts: Iterable[dict]) -> list[dict]:
    out = sorted(dicts, key=lambda d: d["image_key"])
    for a, b in zip(out, out[1:]):
        if a["image_key"] == b["image_key"]:
            raise ValueError(f"duplicate image_key {a['image_key']!r}: image keys must be unique")
    return out


def image_classes(d: dict) -> set[int]:
    """The classes an image holds: those of its boxes and its ``image_labels`` (image-level sets, e.g. X-SDD)."""
    return {int(a["category_id"]) for a in d.get("annotations", [])} | {int(c) for c in d.get("image_labels", [])}


def stratum_keys(dicts: Iterable[dict]) -> dict[str, int]:
    """Stratum of every image, by ``image_key``: its rarest class id, or ``NEGATIVE`` (-1) without boxes
    or image labels.

    "Rarest" = the class with the fewest images (over all of ``dicts``) among those the image
    contains; ties go to the lower class id.
    """
    classes = {d["image_key"]: image_classes(d) for d in dicts}
    freq = Counter(c for cs in classes.values() for c in cs)
    return {k: min(cs, key=lambda c: (freq[c], c)) if cs else NEGATIVE for k, cs in classes.items()}


def _shuffled_strata(dicts: list[dict], seed: int) -> list[tuple[int, list[dict], np.ndarray]]:
    """``(stratum key, its images in image_key order, their seeded permutation)`` per stratum, by key; each
    stratum is shuffled by its own ``numpy.random.default_rng([seed, key + 1])``."""
    ordered = _sorted_by_key(dicts)
    strata = stratum_keys(ordered)
    by_stratum: dict[int, list[dict]] = {}
    for d in ordered:
        by_stratum.setdefault(strata[d["image_key"]], []).append(d)
    return [(k, members, np.random.default_rng([int(seed), k + 1]).permutation(len(members)))
            for k, members in sorted(by_stratum.items())]


def largest_remainder(n: int, ratios: Sequence[float]) -> list[int]:
    """Split ``n`` items into integer counts proportional to ``ratios``, summing to ``n``.

    Floors of the exact shares, then the leftover items go one each to the largest fractional
    remainders (ties: the split with the larger ratio, then the earlier split). Every count is
    within 1 of its exact share ``n * ratio``.
    """
    r = _normalized(ratios)
    exact = n * r
    counts = np.floor(exact + 1e-9).astype(int)
    frac = exact - counts
    order = sorted(range(len(r)), key=lambda i: (-round(frac[i], 9), -r[i], i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def stratified_split(dicts: list[dict], seed: int = 0,
                     ratios: Sequence[float] = DEFAULT_RATIOS) -> dict[str, list[dict]]:
    """Split dataset dicts into ``{"train", "val", "test"}``, balanced per class (70/15/15 by default).

    Rule (a pure function of the annotations and ``seed``; input order does not matter):

    1. Sort images by ``image_key`` (keys must be unique).
    2. Give every image ONE stratum: its rarest class, i.e. among the classes it contains the one
       present in the fewest images of the whole input (ties: lower class id); an image's classes are
       those of its boxes and of its ``image_labels`` (image-level sets). Images without either form
       their own "negative" stratum. (NEU images can hold several classes; stratifying by the
       rarest one protects the small classes.)
    3. Shuffle each stratum with its own local generator ``numpy.random.default_rng([seed, k + 1])``
       (``k`` = stratum key, -1 for negatives; the global RNG is never used), then cut it into
       train/val/test with :func:`largest_remainder` counts, so each stratum is within one image of
       the exact ratios.
    4. Each split is returned in ``image_key`` order. The returned dicts are the input objects.
    """
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for k, members, perm in _shuffled_strata(dicts, seed):
        start = 0
        for name, n in zip(SPLITS, largest_remainder(len(members), ratios)):
            out[name].extend(members[i] for i in perm[start:start + n])
            start += n
    for name in SPLITS:
        out[name].sort(key=lambda d: d["image_key"])
    return out


def stratified_kfold(dicts: list[dict], folds: int, fold: int, seed: int = 0,
                     val_share: float = 0.15) -> dict[str, list[dict]]:
    """Fold ``fold`` of a seeded, class-stratified ``folds``-fold split: ``{"train", "val", "test"}``.

    Strata and their shuffles are those of :func:`stratified_split` (rarest class; ``default_rng([seed, k + 1])``).
    Each stratum is cut into ``folds`` parts with :func:`largest_remainder`; part ``fold`` is the test split, so
    the test splits of the ``folds`` folds partition the data. The other parts, in shuffled order, give the
    validation split (``val_share`` of them, within one image per stratum) and the training split.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: need folds >= 2 and 0 <= fold < folds")
    if not 0.0 <= val_share < 1.0:
        raise ValueError(f"val_share must be in [0, 1), got {val_share}")
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for _, members, perm in _shuffled_strata(dicts, seed):
        bounds = np.cumsum([0] + largest_remainder(len(members), [1.0] * folds))
        test = perm[bounds[fold]:bounds[fold + 1]]
        rest = np.concatenate([perm[bounds[fold + 1]:], perm[:bounds[fold]]])
        n_train, n_val, _ = largest_remainder(len(rest), (1.0 - val_share, val_share, 0.0))
        out["test"].extend(members[i] for i in test)
        out["val"].extend(members[i] for i in rest[n_train:n_train + n_val])
        out["train"].extend(members[i] for i in rest[:n_train])
    for name in SPLITS:
        out[name].sort(key=lambda d: d["image_key"])
    return out


def sha256_files(paths: Iterable[str | os.PathLike]) -> dict:
    """One digest for a set of files: ``{"sha256": hex, "files": count}``.

    Files are taken in sorted order of their path relative to the deepest common folder, and each
    contributes its relative path and content hash, so the digest does not depend on where the
    dataset lives but changes when a file is renamed, edited, added or removed.
    """
    files = [Path(p).resolve() for p in paths]
    if not files:
        return {"sha256": hashlib.sha256().hexdigest(), "files": 0}
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    h = hashlib.sha256()
    for rel, f in sorted((f.relative_to(root).as_posix(), f) for f in files):
        content = file_sha256(f)
        h.update(f"{rel}\0{content}\n".encode())
    return {"sha256": h.hexdigest(), "files": len(files)}


def _split_summary(split: list[dict], class_names: Sequence[str] | None) -> dict:
    def name(c: int) -> str:
        return class_names[c] if class_names is not None else str(c)

    boxes = Counter(int(a["category_id"]) for d in split for a in d.get("annotations", []))
    images = Counter(c for d in split for c in image_classes(d))
    ids = sorted(set(boxes) | (set(range(len(class_names))) if class_names is not None else set()))
    return {
        "images": len(split),
        "negative_images": sum(1 for d in split if not image_classes(d)),
        "boxes": sum(boxes.values()),
        "class_images": {name(c): images[c] for c in ids},
        "class_boxes": {name(c): boxes[c] for c in ids},
        "image_keys": [d["image_key"] for d in split],
    }


def split_manifest(splits: dict[str, list[dict]], seed: int, sources: Iterable[str | os.PathLike],
                   ratios: Sequence[float] = DEFAULT_RATIOS,
                   class_names: Sequence[str] | None = None) -> dict:
    """JSON-ready record of a split: method, seed, ratios, source digest, and per split the image
    keys, image/box counts and per-class image/box counts (keyed by class name when given).

    ``sources`` are the annotation files the dicts were loaded from (see :func:`sha256_files`).
    """
    return {
        "method": SPLIT_METHOD,
        "seed": int(seed),
        "ratios": [float(r) for r in ratios],
        "classes": list(class_names) if class_names is not None else None,
        "sources": sha256_files(sources),
        "splits": {s: _split_summary(splits[s], class_names) for s in SPLITS},
    }


def verify_manifest(manifest: dict, dicts: list[dict],
                    sources: Iterable[str | os.PathLike] | None = None) -> None:
    """Check that ``dicts`` split with the manifest's seed and ratios give the recorded split.

    Raises ValueError naming the first mismatch (method, source digest when ``sources`` is given,
    image keys or counts of a split).
    """
    if manifest.get("method") != SPLIT_METHOD:
        raise ValueError(f"manifest method {manifest.get('method')!r} is not {SPLIT_METHOD!r}")
    if sources is not None:
        got = sha256_files(sources)
        if got != manifest["sources"]:
            raise ValueError(f"annotation sources differ: manifest {manifest['sources']}, files on disk {got}")
    fresh = split_manifest(stratified_split(dicts, manifest["seed"], manifest["ratios"]), manifest["seed"], [],
                           manifest["ratios"], manifest.get("classes"))
    for s in SPLITS:
        want, got = manifest["splits"][s], fresh["splits"][s]
        if want["image_keys"] != got["image_keys"]:
            missing = sorted(set(want["image_keys"]) - set(got["image_keys"]))
            extra = sorted(set(got["image_keys"]) - set(want["image_keys"]))
            raise ValueError(f"split {s!r} differs from the manifest (seed {manifest['seed']}): "
                             f"{len(missing)} recorded keys not recomputed (e.g. {missing[:3]}), "
                             f"{len(extra)} recomputed keys not recorded (e.g. {extra[:3]})")
        for field in sorted(want):
            if want[field] != got[field]:
                raise ValueError(f"split {s!r}: {field} is {got[field]!r}, manifest says {want[field]!r}")
