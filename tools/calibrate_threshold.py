#!/usr/bin/env python
"""Choose the accept/reject score threshold that gives a target false-alarm rate on defect-free images.

    python tools/calibrate_threshold.py --config-file CFG --weights W.pth [--prototypes P.pt] \
        --dataset severstal_val [--good-images DIR ...] [--defect-images DIR ...] --false-alarm 0.01 \
        --out threshold.json [--roc roc.png]

Good images: the images of ``--dataset`` without boxes, plus ``--good-images`` (files, folders, globs).
Defect images: the images of ``--dataset`` with boxes, plus ``--defect-images``. Whole images are scored as
tools/predict.py scores them (strips tiled and merged): an image is rejected when its top detection scores
at least the threshold. Writes the threshold (for ``predict.py --threshold-file``), the achieved false-alarm
rate and defect recall, recall at 1% and 5% false alarms, and the ROC curve (JSON and PNG).
"""
import os
import sys

import _path  # noqa: F401
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger

from steel_fsd.data import dataset_name, register_datasets
from steel_fsd.data.catalog import require_registered
from steel_fsd.inference.predict import Predictor, find_images, top_scores
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.evaluation.image_level import (plot_roc, rates_at, roc_points, summarize,
                                              threshold_for_false_alarm)
from steel_fsd.utils.cli import DATASET_NAME_HELP, UserError, add_config_overrides, check_output_file, model_parser, run_main
from steel_fsd.utils.io import write_json


def dataset_images(name: str) -> tuple[list[str], list[str]]:
    """(good, defect) image files of a registered dataset; tiles are folded back into their image."""
    has_defect: dict[str, bool] = {}
    for d in DatasetCatalog.get(name):
        f = os.path.abspath(d["file_name"])
        has_defect[f] = has_defect.get(f, False) or bool(d.get("annotations"))
    return [f for f, b in has_defect.items() if not b], [f for f, b in has_defect.items() if b]


def main(argv=None) -> int:
    ap = model_parser(__doc__, prototypes="prototype file (prototype configs)", datasets_root=True)
    ap.add_argument("--dataset", help="registered validation dataset (never the test split)" + DATASET_NAME_HELP)
    ap.add_argument("--good-images", nargs="+", default=[], help="known defect-free images: files, folders, globs")
    ap.add_argument("--defect-images", nargs="+", default=[], help="images known to hold a defect")
    ap.add_argument("--false-alarm", type=float, default=0.01, help="target false-alarm rate on good images")
    ap.add_argument("--out", required=True, help="threshold JSON to write")
    ap.add_argument("--roc", help="ROC PNG (default: next to --out)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = add_config_overrides(ap).parse_args(argv)
    setup_logger(name="steel_fsd")
    if not 0 <= args.false_alarm <= 1:
        raise UserError(f"--false-alarm {args.false_alarm} is not a rate", "", "give a value in [0, 1], e.g. 0.01")
    check_output_file(args.out, "--out")
    good, defect = [], []
    if args.dataset:
        register_datasets(args.datasets_root, files=args.datasets_file)
        args.dataset = dataset_name(args.dataset)
        require_registered(args.dataset, "--dataset")
        good, defect = dataset_images(args.dataset)
    if args.good_images:
        good += find_images(args.good_images)
    if args.defect_images:
        defect += find_images(args.defect_images)
    if not good:
        raise UserError("no defect-free image to calibrate on", "--dataset / --good-images",
                        "add a folder of known-good images with --good-images (NEU-DET has none)")
    if not defect:
        raise UserError("no defect image to measure recall on", "--dataset / --defect-images",
                        "add --dataset with annotated images or --defect-images")
    cfg = build_config(args.config_file, list(args.opts) + ["OUTPUT_DIR", os.path.dirname(os.path.abspath(args.out))])
    finalize_config(cfg, datasets=(), weights=args.weights, swap=bool(args.prototypes))
    predictor = Predictor.from_files(cfg, args.weights, args.prototypes, batch_size=args.batch_size)
    print(f"[calibrate] scoring {len(good)} good and {len(defect)} defect images", file=sys.stderr)
    good_scores, skipped_good = top_scores(predictor, good)
    defect_scores, skipped_defect = top_scores(predictor, defect)
    t = threshold_for_false_alarm(good_scores, args.false_alarm)
    fa, recall = rates_at(good_scores, defect_scores, t)
    roc = roc_points(good_scores, defect_scores)
    png = args.roc or os.path.splitext(args.out)[0] + "_roc.png"
    plot_roc(roc, png, (fa, recall), title=f"{os.path.basename(args.weights)}: {len(good_scores)} good / "
                                           f"{len(defect_scores)} defect images")
    result = {"score_threshold": t, "target_false_alarm": args.false_alarm, "false_alarm": fa, "defect_recall": recall,
              "good_images": len(good_scores), "defect_images": len(defect_scores),
              "skipped": skipped_good + skipped_defect, "dataset": args.dataset,
              "good_image_inputs": args.good_images, "weights": args.weights, "prototypes": args.prototypes,
              "config": args.config_file, "summary": summarize(good_scores, defect_scores), "roc_png": png, "roc": roc}
    write_json(args.out, result, indent=2, sort_keys=False)
    print(f"[calibrate] threshold {t:.4f}: {100 * fa:.2f}% false alarms on {len(good_scores)} good images "
          f"(target {100 * args.false_alarm:g}%), defect recall {100 * recall:.1f}% on {len(defect_scores)} -> "
          f"{args.out}, {png}")
    return 1 if result["skipped"] else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
