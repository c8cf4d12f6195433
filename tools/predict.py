#!/usr/bin/env python
"""Run a trained model on image files and folders: boxes, overlays and a pass/fail per image.

    python tools/predict.py --config-file CFG --weights output/.../model_final.pth --input DIR [more ...] \
        --output out/ [--prototypes protos.pt] [--threshold-file threshold.json] [--device cpu|cuda] \
        [--batch-size 8] [--amp bfloat16] [--channels-last] [--prefetch 2] [--masks]

Inputs: image files, folders (searched recursively) and glob patterns; grayscale or RGB, any size (strips
such as Severstal's 1600x256 are tiled as in training and merged back). The training harmonization (CLAHE,
resize, the training run's pixel statistics, read from ``pixel_stats.json`` next to the weights) is applied.
Writes, under ``--output``:
  predictions.json   COCO results (image_id = the row of predictions.csv, file_name, category_id, bbox xywh, score)
  predictions.csv    one row per image: file, size, detections, defect (0/1), worst class, max score, decision
  detections.csv     one row per detection: image, class, score, box (x1 y1 x2 y2), mask area in pixels (--masks)
  overlays/*.png     the image with boxes, class and score (scores >= --overlay-score), and masks (--masks)
With ``--masks`` (a mask model, e.g. configs/masks/): each detection's mask in image pixels, as COCO RLE
(``segmentation``) and its pixel count (``area``) in predictions.json, its area in detections.csv.
  summary.json       counts, threshold and its source, skipped images, images/s
An unreadable image is reported, skipped and counted; the run then exits 1 unless ``--allow-skips``.
"""
import math
import os
import sys
import time

import _path  # noqa: F401
import numpy as np
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from steel_fsd.inference.predict import Predictor, find_images, image_decision, predict_paths
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.utils.cli import (UserError, add_config_overrides, check_output_dir, model_parser, output_lock,
                                 run_main, skips_exit_code)
from steel_fsd.utils.io import read_json, write_csv, write_image, write_json

CSV_HEADER = ["image_id", "file", "width", "height", "detections", "defect", "worst_class", "max_score", "decision",
              "error"]
DETECTIONS_HEADER = ["image_id", "file", "class", "score", "x1", "y1", "x2", "y2", "mask_area"]


def mask_rle(mask) -> dict:
    """HxW bool mask -> COCO RLE with ``counts`` as text (JSON-ready; pycocotools decodes it back)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def load_threshold(path: str | None, default: float) -> tuple[float, str]:
    """(score threshold, where it came from): ``--threshold-file`` (from tools/calibrate_threshold.py) or the
    config's TEST.PRF_SCORE_THRESH. A threshold that is not a number in [0, 1] would pass (NaN, above 1) or
    reject (below 0) every image: refused."""
    if not path:
        value, source = default, "TEST.PRF_SCORE_THRESH"
    else:
        data = read_json(path, "threshold file")
        value = data.get("score_threshold") if isinstance(data, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"--threshold-file {path} has no numeric score_threshold (got {value!r})", "",
                            "write one with tools/calibrate_threshold.py")
        source = path
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise UserError(f"score threshold {value} from {source} is not a number in [0, 1]", "",
                        "scores are probabilities: give a threshold between 0 and 1 (tools/calibrate_threshold.py "
                        "picks one at a false-alarm rate)")
    return float(value), source


def overlay(image_rgb: np.ndarray, instances, class_names: list[str], min_score: float) -> np.ndarray:
    """RGB overlay: boxes, class and score on a dimmed-free copy of the image, labels on a solid background
    (legible on dark and on bright steel)."""
    vis = Visualizer(image_rgb, metadata=None, scale=max(1.0, 400 / max(image_rgb.shape[:2])),
                     instance_mode=ColorMode.IMAGE)
    keep = instances[instances.scores >= min_score]
    if keep.has("pred_masks"):
        for mask in keep.pred_masks.numpy():
            vis.draw_binary_mask(mask, color="yellow", alpha=0.35)
    for box, score, cls in zip(keep.pred_boxes.tensor.tolist(), keep.scores.tolist(), keep.pred_classes.tolist()):
        vis.draw_box(box, edge_color="red", alpha=1.0)
        vis.draw_text(f"{class_names[cls]} {score:.2f}", (box[0], box[1]), color="white", horizontal_alignment="left",
                      font_size=vis._default_font_size)
        vis.output.ax.texts[-1].set_bbox({"facecolor": "black", "alpha": 0.7, "pad": 1, "edgecolor": "none"})
    return vis.output.get_image()


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output_dir(args.output, "--output")
    with output_lock(args.output, "--output"):
        return predict(args)


def parse_args(argv):
    ap = model_parser(__doc__)
    ap.add_argument("--input", nargs="+", required=True, help="image files, folders (recursive), glob patterns")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--threshold-file", help="score threshold from tools/calibrate_threshold.py")
    ap.add_argument("--overlay-score", type=float, help="draw boxes scoring >= this (default: the threshold)")
    ap.add_argument("--tile", default="auto", help="'auto' (a model trained on tiles: strips into squares of their "
                    "short side, <= 256; one trained on whole images: never), a tile size in pixels, or 0 (never)")
    ap.add_argument("--batch-size", type=int, default=8, help="images (tiles) per forward pass")
    ap.add_argument("--device", help="cpu or cuda (default: the config's MODEL.DEVICE)")
    ap.add_argument("--amp", choices=["bfloat16", "float16"], help="mixed precision (autocast) inference; "
                    "boxes equal to float32 within rounding (float16 on CPU falls back to bfloat16)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC convolution weights (faster on GPUs)")
    ap.add_argument("--prefetch", type=int, default=0, metavar="N",
                    help="threads reading and harmonizing the next N batches during the forward pass (same results)")
    ap.add_argument("--masks", action="store_true", help="a mask model's masks: RLE and area in predictions.json, "
                    "area in detections.csv, drawn on the overlays")
    ap.add_argument("--no-overlays", action="store_true")
    ap.add_argument("--allow-skips", action="store_true", help="exit 0 even if unreadable images were skipped")
    args = add_config_overrides(ap).parse_args(argv)
    if args.tile != "auto" and not (args.tile.isdigit() and (int(args.tile) == 0 or int(args.tile) >= 32)):
        ap.error(f"--tile {args.tile}: give 'auto', a tile size of at least 32 pixels, or 0 (never tile)")
    if args.overlay_score is not None and not 0.0 <= args.overlay_score <= 1.0:
        ap.error(f"--overlay-score {args.overlay_score}: scores are in [0, 1]")
    return args


def predict(args) -> int:
    setup_logger(name="steel_fsd")
    # Checks before any work: output writable (checked by main), inputs exist, threshold and model load.
    files = find_images(args.input)
    opts = list(args.opts) + (["MODEL.DEVICE", args.device] if args.device else []) + ["OUTPUT_DIR", args.output]
    cfg = build_config(args.config_file, opts)
    # the training run's pixel statistics (and class count, for a prototype swap)
    finalize_config(cfg, datasets=(), weights=args.weights, swap=bool(args.prototypes))
    threshold, source = load_threshold(args.threshold_file, cfg.TEST.PRF_SCORE_THRESH)
    if args.masks and not cfg.MODEL.MASK_ON:
        raise UserError(f"--masks: {args.config_file} has no mask branch (MODEL.MASK_ON is False)", "",
                        "use a mask model's config and weights (configs/masks/), or leave out --masks")
    tile = args.tile if args.tile == "auto" else int(args.tile)
    predictor = Predictor.from_files(cfg, args.weights, args.prototypes, tile=tile, batch_size=args.batch_size,
                                     amp=args.amp, channels_last=args.channels_last, prefetch=args.prefetch)
    names = predictor.class_names
    min_score = threshold if args.overlay_score is None else args.overlay_score
    if not args.no_overlays:
        os.makedirs(os.path.join(args.output, "overlays"), exist_ok=True)

    results, rows, det_rows, skipped = [], [], [], []
    start, n_done = time.perf_counter(), 0
    for image_id, path, img, inst, error in predict_paths(predictor, files):
        if error is not None:
            skipped.append(path)
            rows.append([image_id, path, "", "", "", "", "", "", "skipped", str(error)])
            continue
        n_done += 1
        d = image_decision(inst, names, threshold)
        h, w = img.shape[:2]
        if not args.masks and inst.has("pred_masks"):
            inst.remove("pred_masks")
        masks = inst.pred_masks if args.masks else [None] * len(inst)
        for box, score, cls, mask in zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist(),
                                         inst.pred_classes.tolist(), masks):
            result = {"image_id": image_id, "file_name": path, "category_id": cls, "category_name": names[cls],
                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score}
            area = ""
            if mask is not None:
                area = int(mask.sum())
                result.update(segmentation=mask_rle(mask), area=area)
            results.append(result)
            det_rows.append([image_id, path, names[cls], round(score, 4), *(round(v, 1) for v in box), area])
        rows.append([image_id, path, w, h, len(inst), int(d.defect), d.worst_class, round(d.max_score, 4),
                     "reject" if d.defect else "pass", ""])
        if not args.no_overlays:
            rgb = img[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else img
            png = os.path.join(args.output, "overlays", f"{image_id:06d}_{os.path.splitext(os.path.basename(path))[0]}.png")
            write_image(png, overlay(np.ascontiguousarray(rgb), inst, names, min_score)[:, :, ::-1])
    seconds = time.perf_counter() - start
    write_csv(os.path.join(args.output, "predictions.csv"), CSV_HEADER, rows)
    write_csv(os.path.join(args.output, "detections.csv"), DETECTIONS_HEADER, det_rows)
    write_json(os.path.join(args.output, "predictions.json"), results)
    rejected = sum(1 for r in rows if r[8] == "reject")
    summary = {"images": len(files), "predicted": n_done, "skipped": len(skipped), "skipped_files": skipped,
               "rejected": rejected, "passed": n_done - rejected, "score_threshold": threshold,
               "threshold_source": source, "classes": names, "seconds": round(seconds, 2),
               "images_per_s": round(n_done / max(seconds, 1e-9), 2), "weights": args.weights,
               "prototypes": args.prototypes or None, "device": cfg.MODEL.DEVICE, "batch_size": args.batch_size,
               "amp": args.amp, "channels_last": args.channels_last, "prefetch": args.prefetch, "masks": args.masks}
    write_json(os.path.join(args.output, "summary.json"), summary, indent=2, sort_keys=False)
    print(f"[predict] {n_done} images ({rejected} rejected at score >= {threshold:g}, {len(skipped)} skipped) "
          f"in {seconds:.1f} s -> {args.output}")
    return skips_exit_code("predict", skipped, "predictions.csv", args.allow_skips)


if __name__ == "__main__":
    sys.exit(run_main(main))
