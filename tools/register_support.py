#!/usr/bin/env python
"""Build class prototypes from K support instances per class, for a prototype-head model.

    python tools/register_support.py --config-file CFG --weights MODEL.pth --dataset severstal_synth_tiled_train \
        --shots 5 --seed 0 --out protos.pt [--support-manifest FILE] [--classes NAME ...]
        [--append-to OLD.pt | --with-trained]

Then evaluate with exactly those classes, no retraining:
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS MODEL.pth \
        MODEL.PROTOTYPE.SUPPORT_FILE protos.pt DATASETS.TEST "('severstal_synth_tiled_test',)"
"""
import sys

import _path  # noqa: F401
from detectron2.utils.logger import setup_logger

from steel_fsd.data import dataset_name, register_datasets
from steel_fsd.fewshot.adapt import register_support
from steel_fsd.data.catalog import require_registered
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.utils.cli import DATASET_NAME_HELP, add_config_overrides, check_output_file, model_parser, run_main
from steel_fsd.utils.io import read_json


def main(argv=None) -> None:
    ap = model_parser(__doc__, prototypes=None, datasets_root=True)
    ap.add_argument("--dataset", required=True, help="registered dataset to draw the support set from" + DATASET_NAME_HELP)
    ap.add_argument("--shots", type=int, required=True, help="K instances (boxes) per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="prototype file to write")
    ap.add_argument("--support-manifest", help="JSON list of {image_key[, bbox]}: draw supports only from these")
    ap.add_argument("--classes", nargs="+", help="only these classes (e.g. one new rare defect)")
    ap.add_argument("--append-to", help="add the new classes to this existing prototype file")
    ap.add_argument("--strict", action="store_true", help="refuse when a class has fewer than --shots boxes "
                    "(default: use all it has and say how many)")
    ap.add_argument("--with-trained", action="store_true",
                    help="add the new classes (--classes) to the model's own prototypes of the classes it was "
                         "trained on: only the new classes' support images are embedded")
    args = add_config_overrides(ap).parse_args(argv)
    setup_logger(name="steel_fsd")
    register_datasets(args.datasets_root, files=args.datasets_file)
    args.dataset = dataset_name(args.dataset)
    cfg = build_config(args.config_file, args.opts)
    require_registered(args.dataset, "--dataset")
    check_output_file(args.out, "--out")
    # only --dataset is read; the model's class count and pixel statistics are its training run's
    finalize_config(cfg, datasets=(), weights=args.weights, swap=True)
    manifest = None
    if args.support_manifest:
        manifest = read_json(args.support_manifest, "K-shot manifest")
    ps = register_support(cfg, args.weights, args.dataset, args.shots, args.seed, args.out, args.classes,
                          manifest, args.support_manifest or "manifest", args.append_to,
                          with_trained=args.with_trained, strict=args.strict)
    print(f"[register_support] {args.out}: classes {ps.class_names}, K={args.shots}, seed={args.seed}")


if __name__ == "__main__":
    sys.exit(run_main(main))
