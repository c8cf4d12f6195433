#!/usr/bin/env python
"""Resize a detector checkpoint's class-specific layers to a new class list (two-phase fine-tuning).

    python tools/ckpt_surgery.py --src model_final.pth --dst model_resized.pth \
        [--source-classes A B ... | --source-dataset NAME] (--target-classes A B ... | --target-dataset NAME) \
        [--seed 0] [--init-prototypes protos.pt] [--datasets-root DIR]

Classes are matched by name (see :mod:`steel_fsd.modeling.surgery`); ``--*-dataset`` takes a registered
dataset's ``thing_classes``; without a source, the class names stored in the checkpoint (steel-fsd checkpoints
store them; given names must equal them). Only the model weights are written, so fine-tuning starts at iteration 0:
    python tools/train_net.py --config-file CFG MODEL.WEIGHTS model_resized.pth ...
Prints the report (copied, new and dropped classes, heads resized) as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

import _path  # noqa: F401  (a source checkout works without installing steel_fsd)

from detectron2.data import MetadataCatalog

from steel_fsd.data import dataset_name, register_datasets
from steel_fsd.data.catalog import require_registered
from steel_fsd.fewshot.prototypes import load_prototypes
from steel_fsd.modeling.surgery import resize_checkpoint
from steel_fsd.utils.cli import add_dataset_args, check_output_file, run_main


def dataset_classes(name: str, option: str) -> list[str]:
    """``thing_classes`` of a registered dataset."""
    require_registered(name, option)
    return list(MetadataCatalog.get(name).thing_classes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="trained checkpoint (.pth)")
    p.add_argument("--dst", required=True, help="resized checkpoint to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source-classes", nargs="+", help="class names of --src, in its order (default: the names "
                     "stored in steel-fsd checkpoints)")
    src.add_argument("--source-dataset", help="registered dataset whose thing_classes --src was trained on")
    tgt = p.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target-classes", nargs="+", help="class names of the fine-tuned model, in its order")
    tgt.add_argument("--target-dataset", help="registered dataset whose thing_classes to resize to")
    p.add_argument("--seed", type=int, default=0, help="seed of the new classes' random initialisation")
    p.add_argument("--init-prototypes", help="prototype file (register_support.py): bank rows of new classes")
    p.add_argument("--datasets-root", help="datasets folder to register (default $STEEL_FSD_DATASETS, else ./datasets)")
    add_dataset_args(p, register_option=False)
    args = p.parse_args(argv)
    if args.source_dataset or args.target_dataset:
        register_datasets(args.datasets_root, files=args.datasets_file)
    source = args.source_classes or (dataset_classes(dataset_name(args.source_dataset, "--source-dataset"), "--source-dataset")
                                     if args.source_dataset else None)
    target = args.target_classes or dataset_classes(dataset_name(args.target_dataset, "--target-dataset"), "--target-dataset")
    init = None
    if args.init_prototypes:
        ps = load_prototypes(args.init_prototypes)
        init = dict(zip(ps.class_names, ps.prototypes))
    check_output_file(args.dst, "--dst")
    report = resize_checkpoint(args.src, args.dst, source, target, args.seed, init)
    print(json.dumps({"src": args.src, "dst": args.dst, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
