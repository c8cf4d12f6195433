#!/usr/bin/env python
"""Write seeded K-shot support manifests of a registered dataset, one per (K, seed).

    python tools/prepare_fewshot.py --dataset neu_train --shots 1 5 10 --seeds 0 1 2 --out datasets/fewshot \
        [--eval-dataset neu_test] [--datasets-root DIR]

Writes ``OUT/<dataset>_<K>shot_seed<S>.json`` (see :mod:`steel_fsd.fewshot.support`; the file name
is only a label, the manifest's fields are the source of truth) and nothing else. Same data and seeds
give byte-identical files. With ``--eval-dataset`` it refuses (exit 1, nothing written) when a support
image is also in that split. Prints one summary line per manifest.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _path  # noqa: F401  (a source checkout works without installing steel_fsd)

from detectron2.data import DatasetCatalog, MetadataCatalog

from steel_fsd.data import dataset_name, register_datasets
from steel_fsd.data.catalog import datasets_root, require_registered
from steel_fsd.fewshot.support import annotation_sources, assert_disjoint, kshot_manifest, write_manifest
from steel_fsd.data.splits import sha256_files
from steel_fsd.utils.cli import DATASET_NAME_HELP, add_dataset_args, check_output_dir, run_main


def registered_sources(name: str) -> list[Path]:
    """Annotation files of a registered dataset (of each part, for a union), from its metadata."""
    meta = MetadataCatalog.get(name)
    if meta.get("parts"):
        return [p for part in meta.parts for p in registered_sources(part)]
    root = meta.get("dataset_root")
    if not root:
        raise ValueError(f"{name}: its metadata has no dataset_root, so its annotation files are unknown")
    return annotation_sources(root)


def _get(name: str, option: str) -> list[dict]:
    require_registered(name, option)
    return DatasetCatalog.get(name)


def _check_root(name: str, root: str) -> None:
    """Refuse a dataset registered from outside ``root`` (e.g. an earlier registration from ./datasets)."""
    got = MetadataCatalog.get(name).get("dataset_root")
    if got and os.path.commonpath([os.path.abspath(got), root]) != root:
        raise ValueError(f"{name} is registered from {got}, not under --datasets-root {root}")


def summary(file_name: str, m: dict) -> str:
    """``"<file>: <dataset> K=.. seed=..: N supports in M images, per class {...}[, shortfall {...}]"``."""
    per_class = ", ".join(f"{c}: {v['selected']}" for c, v in m["counts"].items())
    short = {c: v["shortfall"] for c, v in m["counts"].items() if v["shortfall"]}
    images = len({e["image_key"] for e in m["supports"]})
    line = (f"{file_name}: {m['dataset']} K={m['shots']} seed={m['seed']}: {len(m['supports'])} supports in "
            f"{images} images, per class {{{per_class}}}")
    return line + (f", shortfall {short}" if short else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="registered dataset to draw supports from (normally a train split)" + DATASET_NAME_HELP)
    p.add_argument("--shots", type=int, nargs="+", required=True, help="K values: instances (boxes) per class")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="sampling seeds")
    p.add_argument("--out", type=Path, required=True, help="output folder for the manifests")
    p.add_argument("--eval-dataset", help="registered evaluation split that must not contain any support image")
    p.add_argument("--datasets-root", help="datasets folder to register (default $STEEL_FSD_DATASETS, else ./datasets)")
    add_dataset_args(p, register_option=False)
    args = p.parse_args(argv)
    if min(args.shots) < 1:
        p.error("--shots must all be >= 1")
    root = os.path.abspath(args.datasets_root) if args.datasets_root else datasets_root()
    outputs: dict[str, dict] = {}
    # everything is computed and checked before anything is written
    register_datasets(root, files=args.datasets_file)
    args.dataset = dataset_name(args.dataset)
    if args.datasets_root:
        _check_root(args.dataset, root)
    dicts = _get(args.dataset, "--dataset")
    eval_dicts = _get(args.eval_dataset, "--eval-dataset") if args.eval_dataset else None
    classes = list(MetadataCatalog.get(args.dataset).thing_classes)
    digest = sha256_files(registered_sources(args.dataset))["sha256"]
    for k in dict.fromkeys(args.shots):
        for s in dict.fromkeys(args.seeds):
            m = kshot_manifest(dicts, classes, k, s, digest, args.dataset)
            if eval_dicts is not None:
                assert_disjoint(m, eval_dicts)
            outputs[f"{args.dataset}_{k}shot_seed{s}.json"] = m
    check_output_dir(str(args.out), "--out")
    for file_name, m in outputs.items():
        write_manifest(args.out / file_name, m)
        print(summary(file_name, m))
    print(f"wrote {len(outputs)} manifests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
