#!/usr/bin/env python
"""Pretrain a config's ResNet backbone on steel images without downloads (SimCLR, NNCLR or image labels).

    python tools/pretrain_backbone.py --config-file configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml \
        (--images DIR [DIR ...] | --datasets NAME [NAME ...]) --method simclr|nnclr|supervised \
        --epochs 20 --out output/pretrain/r18_simclr.pth [--classes NAME ...] [--crop 128] [KEY VALUE ...]

Then train any detector config of the same backbone with ``MODEL.WEIGHTS output/pretrain/r18_simclr.pth``.
``--images`` reads every image under the folders (labels ignored); ``--datasets`` reads registered datasets.
``supervised`` learns image-level labels from the datasets' boxes; ``--classes`` restricts them (in a
base/novel setting pass the base classes only: images holding a box of another class are then left out, as in
the protocol's base training). Pixel statistics and harmonization are the config's
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
from steel_fsd.pretrain.train import METHODS, folder_dicts, pretrain
from steel_fsd.utils.cli import DATASET_NAME_HELP, UserError, add_dataset_args, check_output_file, run_main


logger = logging.getLogger("steel_fsd")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="folders of images (searched recursively; labels ignored)")
    src.add_argument("--datasets", nargs="+", help="registered datasets" + DATASET_NAME_HELP)
    ap.add_argument("--method", choices=METHODS, default="simclr")
    ap.add_argument("--classes", nargs="+", help="supervised: only these classes' image labels")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=0, help="side of the augmented views in pixels (default: the "
                                                        "config's image size; e.g. 128 for about 2.4x fewer FLOPs)")
    ap.add_argument("--out", required=True, help="backbone weights to write (.pth)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    ap.add_argument("--datasets-root", help="datasets folder to register (default $STEEL_FSD_DATASETS, else ./datasets)")
    add_dataset_args(ap, register_option=False)
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch < 2 or not args.lr > 0:
        ap.error(f"--epochs {args.epochs}, --batch {args.batch}, --lr {args.lr}: need at least 1 epoch, a batch of at "
                 "least 2 images (contrastive pairs and BatchNorm need two) and a positive learning rate")
    setup_logger(name="steel_fsd")
    register_datasets(args.datasets_root, files=args.datasets_file)
    if args.datasets:
        args.datasets = [dataset_name(d, "--datasets") for d in args.datasets]
    cfg = build_config(args.config_file, args.opts)
    check_output_file(args.out, "--out")
    finalize_config(cfg, datasets=("TRAIN",))  # the detector's pixel statistics
    if args.images:
        if args.method == "supervised":
            raise UserError("--method supervised needs labels", "--images", "pass --datasets NAME instead")
        dicts = folder_dicts(args.images)
    else:
        for name in args.datasets:
            require_registered(name, "--datasets", nonempty=True)
        dicts = [d for name in args.datasets for d in DatasetCatalog.get(name)]
    classes = None
    if args.method == "supervised":
        names = list(MetadataCatalog.get(args.datasets[0]).thing_classes)
        unknown = sorted(set(args.classes or []) - set(names))
        if unknown:
            raise UserError(f"--classes {unknown} are not classes of {args.datasets[0]}", "--classes", f"choose from {names}")
        if args.classes:  # base/novel: base labels only, and images holding other classes' boxes dropped, so
            # a novel defect is never learned as "none of the classes" (the protocol's base-training rule)
            kept = restrict_classes(dicts, names, args.classes, drop_images_with_others=True)
            logger.info("pretrain supervised: %d of %d images hold only boxes of %s; the others are not used",
                        len(kept), len(dicts), args.classes)
            if not kept:
                raise UserError(f"no image of {args.datasets} holds only boxes of {args.classes}", "--classes",
                                "name more classes")
            dicts = kept
        classes = list(range(len(args.classes or names)))
    record = pretrain(cfg, dicts, args.method, args.epochs, args.out, args.batch, args.lr, label_classes=classes,
                      seed=args.seed, crop=args.crop)
    print(json.dumps(record, indent=1))
    print(f"wrote {args.out}: train with MODEL.WEIGHTS {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
