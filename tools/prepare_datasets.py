#!/usr/bin/env python
"""Load NEU-DET and/or Severstal, split them 70/15/15 (seeded, class-stratified) and write COCO files.

    python tools/prepare_datasets.py --neu datasets/neu-det --severstal datasets/severstal --out datasets/splits

Writes ``OUT/{neu,severstal}_{train,val,test}.json`` (COCO instances; ``file_name`` relative to the
dataset root given, so register them with that root as ``image_root``) and ``OUT/splits.json`` (one
manifest per dataset: seed, ratios, annotation-source digest, image keys and per-class counts per
split; entries of datasets not named in this run are kept). Outputs hold no timestamps or absolute
paths: the same inputs and seed give byte-identical files. Prints a per-class table of images and
boxes per split, and the skip counts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _path  # noqa: F401  (a source checkout works without installing steel_fsd)
from tabulate import tabulate

from steel_fsd.data.coco import to_coco, write_coco
from steel_fsd.data.errors import SkipLog
from steel_fsd.data.images import verify_images
from steel_fsd.data.splits import DEFAULT_RATIOS, SPLITS, split_manifest, stratified_split
from steel_fsd.utils.cli import check_output_dir, run_main
from steel_fsd.utils.io import write_json


def load_dataset(name: str, root: Path, skips: SkipLog) -> tuple[list[dict], list[str], list[Path]]:
    """Dataset dicts, class names and annotation source files of ``name`` ("neu" or "severstal").

    The sources are the XML files of NEU's annotation folders, or the one CSV Severstal's loader
    reads (``train.csv`` if present, else ``train_v2.csv``).
    """
    if name == "neu":
        from steel_fsd.data.neu import NEU_CLASSES, annotation_dirs, load_neu_voc
        dicts = load_neu_voc(root, skips=skips)
        sources = [p for d in annotation_dirs(root) for p in d.iterdir() if p.suffix.lower() == ".xml"]
        return dicts, list(NEU_CLASSES), sources
    from steel_fsd.data.severstal import CSV_NAMES, SEVERSTAL_CLASSES, load_severstal
    dicts = load_severstal(root, skips=skips)
    return dicts, list(SEVERSTAL_CLASSES), [next(root / n for n in CSV_NAMES if (root / n).is_file())]


def summary_table(name: str, manifest: dict, skips: SkipLog) -> str:
    """Per-class images/boxes per split, negatives and totals, and the skips, as aligned text."""
    splits = manifest["splits"]
    rows = [[c] + [f"{splits[s]['class_images'][c]}/{splits[s]['class_boxes'][c]}" for s in SPLITS]
            for c in manifest["classes"]]
    rows.append(["(no boxes)"] + [f"{splits[s]['negative_images']}/0" for s in SPLITS])
    rows.append(["total"] + [f"{splits[s]['images']}/{splits[s]['boxes']}" for s in SPLITS])
    header = [f"{name}: class"] + [f"{s} images/boxes" for s in SPLITS]
    table = tabulate(rows, headers=header, tablefmt="plain", disable_numparse=True,
                     colalign=("left",) + ("right",) * len(SPLITS))
    return f"{table}\n{name}: skips: {skips.summary()}"


def prepare(name: str, root: Path, seed: int, strict: bool, check_images: bool) -> tuple[dict, dict[str, dict]]:
    """Load, optionally verify, and split one dataset; its splits.json entry and COCO dicts by file name."""
    skips = SkipLog(strict=strict)
    dicts, classes, sources = load_dataset(name, root, skips)
    if check_images:
        dicts = verify_images(dicts, skips, name, progress=True)
    splits = stratified_split(dicts, seed, DEFAULT_RATIOS)
    manifest = split_manifest(splits, seed, sources, DEFAULT_RATIOS, classes)
    cocos = {f"{name}_{s}.json": to_coco(splits[s], classes, f"{name}_{s}", image_root=root) for s in SPLITS}
    manifest["coco"] = dict(zip(SPLITS, cocos))
    manifest["skips"] = dict(sorted(skips.counts.items()))
    print(summary_table(name, manifest, skips))
    return manifest, cocos


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--neu", type=Path, help="NEU-DET root (IMAGES/ + ANNOTATIONS/, or train/validation layout)")
    p.add_argument("--severstal", type=Path, help="Severstal root (train.csv or train_v2.csv + train_images/)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the COCO files and splits.json")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--non-strict", action="store_true", help="skip and count bad items instead of stopping")
    p.add_argument("--no-verify-images", dest="verify_images", action="store_false",
                   help="skip decoding every image before splitting (corrupt, truncated and empty images are "
                        "otherwise an error naming the file, or counted skips with --non-strict)")
    args = p.parse_args(argv)
    todo = {n: r for n, r in (("neu", args.neu), ("severstal", args.severstal)) if r is not None}
    if not todo:
        p.error("give --neu and/or --severstal")
    manifest_path = args.out / "splits.json"
    manifests = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    outputs: dict[str, dict] = {}
    for name, root in todo.items():  # everything is computed before anything is written: a failed run leaves OUT as it was
        manifests[name], cocos = prepare(name, root, args.seed, not args.non_strict, args.verify_images)
        outputs.update(cocos)
    check_output_dir(str(args.out), "--out")
    for file_name, coco in outputs.items():
        write_coco(args.out / file_name, coco)
    write_json(manifest_path, dict(sorted(manifests.items())), sort_keys=False)
    print(f"wrote {', '.join(outputs)} and splits.json to {args.out}")
    return 0

if __name__ == "__main__":
    sys.exit(run_main(main))
