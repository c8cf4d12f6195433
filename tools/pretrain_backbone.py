#!/usr/bin/env python
"""Pretrain a config's ResNet backbone on steel images without downloads (SimCLR, NNCLR, image labels or both).

    python tools/pretrain_backbone.py --config-file configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml \
        [--images DIR ...] [--datasets NAME ...] --method simclr|nnclr|supervised|supervised+simclr \
        --epochs 20 --out output/pretrain/r18_simclr.pth [--classes NAME ...] [--exclude-classes NAME ...] \
        [--probe neu_val xsdd_val] [--crop 128] [--device cuda --amp --shard-mib 16] [KEY VALUE ...]

Then train any detector config of the same backbone with ``MODEL.WEIGHTS output/pretrain/r18_simclr.pth``.
``--images`` reads every image under the folders (labels ignored); ``--datasets`` reads registered datasets,
several at once (e.g. ``neu_train xsdd_train mt_train severstal_tiled_train``). ``supervised`` learns image-level
labels from each dataset's boxes or image labels, with one classifier per dataset; ``supervised+simclr`` adds
SimCLR's loss over every image, folders included. ``--classes`` restricts the labels of the datasets holding
those classes (in a base/novel setting pass the base classes: images holding a box of another class of that
dataset are then left out, as in the protocol's base training); ``--exclude-classes`` leaves out every image
holding one of the named (novel) classes, from every source. Images of a validation or test split of any
registered dataset are refused. Pixel statistics and harmonization are the config's
(``DATASETS.TRAIN`` must be registered). Resumable (``OUT.state.pth``); the run record is ``OUT.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import _path  # noqa: F401  (a source checkout works without installing steel_fsd)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

from steel_fsd.data import dataset_name, register_datasets
from steel_fsd.data.catalog import require_registered
from steel_fsd.data.subsets import restrict_classes
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.pretrain.sources import SOURCE_KEY, check_no_held_out, drop_classes
from steel_fsd.pretrain.train import METHODS, folder_dicts, pretrain
from steel_fsd.utils.cli import DATASET_NAME_HELP, UserError, add_dataset_args, check_output_file, run_main


logger = logging.getLogger("steel_fsd")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--images", nargs="+", help="folders of images (searched recursively; labels ignored)")
    ap.add_argument("--datasets", nargs="+", help="registered datasets, each a source with its own labels"
                    + DATASET_NAME_HELP)
    ap.add_argument("--method", choices=METHODS, default="simclr")
    ap.add_argument("--classes", nargs="+", help="supervised: for each dataset holding any of these classes, only "
                                                 "these classes' labels (its images holding another class left out)")
    ap.add_argument("--exclude-classes", nargs="+", default=[],
                    help="novel classes: images holding one of them are left out of every source")
    ap.add_argument("--probe", nargs="+", default=[], help="held-out labelled datasets (e.g. neu_val xsdd_val): "
                                                           "linear-probe accuracy before training and after each epoch")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=0, help="side of the augmented views in pixels (default: the "
                                                        "config's image size; e.g. 128 for about 2.4x fewer FLOPs)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPUs)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop after the first epoch that ends past this wall time (0: every epoch)")
    ap.add_argument("--shard-mib", type=float, default=0,
                    help="write the backbone in pieces of at most this many MiB (0: one file)")
    ap.add_argument("--out", required=True, help="backbone weights to write (.pth)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    ap.add_argument("--datasets-root", help="datasets folder to register (default $STEEL_FSD_DATASETS, else ./datasets)")
    add_dataset_args(ap, register_option=False)
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch < 2 or not args.lr > 0 or args.shard_mib < 0 or args.max_minutes < 0:
        ap.error(f"--epochs {args.epochs}, --batch {args.batch}, --lr {args.lr}, --shard-mib {args.shard_mib}: need at "
                 "least 1 epoch, a batch of at least 2 images (contrastive pairs and BatchNorm need two), a positive "
                 "learning rate, and a piece size and a time budget of 0 or more")
    if not args.images and not args.datasets:
        ap.error("give --images and/or --datasets")
    setup_logger(name="steel_fsd")
    register_datasets(args.datasets_root, files=args.datasets_file)
    args.datasets = [dataset_name(d, "--datasets") for d in args.datasets or []]
    args.probe = [dataset_name(d, "--probe") for d in args.probe]
    cfg = build_config(args.config_file, args.opts)
    check_output_file(args.out, "--out")
    finalize_config(cfg, datasets=("TRAIN",))  # the detector's pixel statistics
    if args.method.startswith("supervised") and not args.datasets:
        raise UserError(f"--method {args.method} needs labels", "--images", "pass --datasets NAME as well")
    dicts = [dict(d, **{SOURCE_KEY: ""}) for d in folder_dicts(args.images)] if args.images else []
    names = {"": []}
    for name in args.datasets + args.probe:
        require_registered(name, "--probe" if name in args.probe else "--datasets", nonempty=True)
    for name in args.datasets:
        names[name] = list(MetadataCatalog.get(name).thing_classes)
        dicts += [dict(d, **{SOURCE_KEY: name}) for d in DatasetCatalog.get(name)]
    check_no_held_out(dicts, "--images/--datasets")
    if args.exclude_classes:
        dicts = drop_classes(dicts, names, args.exclude_classes)
    spaces = None
    if args.method.startswith("supervised"):
        unknown = sorted(set(args.classes or []) - {c for n in args.datasets for c in names[n]})
        if unknown:
            raise UserError(f"--classes {unknown} are not classes of {args.datasets}", "--classes",
                            f"choose from {sorted({c for n in args.datasets for c in names[n]})}")
        spaces = {}
        for name in args.datasets:
            own = [c for c in names[name] if c not in args.exclude_classes]
            if args.classes and set(args.classes) & set(own):
                # base/novel: base labels only, and images holding other classes dropped, so a novel defect is
                # never learned as "none of the classes" (the protocol's base-training rule)
                mine = [d for d in dicts if d[SOURCE_KEY] == name]
                kept = restrict_classes(mine, names[name], args.classes, drop_images_with_others=True)
                logger.info("pretrain supervised: %d of %d images of %s hold only boxes of %s; the others are not "
                            "used", len(kept), len(mine), name, args.classes)
                dicts = [d for d in dicts if d[SOURCE_KEY] != name] + kept
                own = [c for c in args.classes if c in own]
            spaces[name] = [names[name].index(c) for c in own]
        if not any(d[SOURCE_KEY] in spaces for d in dicts):
            raise UserError(f"no image of {args.datasets} is left to learn labels from", "--classes",
                            "name more classes")
        spaces = {k: v for k, v in spaces.items() if v}  # a dataset without the named classes keeps its own
        logger.info("pretrain: classes learned per dataset %s", {k: len(v) for k, v in spaces.items()})
    if not dicts:
        raise UserError("no image left to pretrain on", "--datasets", "name more datasets or fewer --exclude-classes")
    probes = {name: DatasetCatalog.get(name) for name in args.probe}
    record = pretrain(cfg, dicts, args.method, args.epochs, args.out, args.batch, args.lr, label_spaces=spaces,
                      seed=args.seed, crop=args.crop, probes=probes, device=args.device, amp=args.amp,
                      shard_mib=args.shard_mib, max_minutes=args.max_minutes)
    print(json.dumps(record, indent=1))
    print(f"wrote {args.out}: train with MODEL.WEIGHTS {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
