#!/usr/bin/env python
"""Segment a defect class from a few example masks: mask PNGs, overlays and the defect area of each image.

    # train a segmenter on a dataset with masks (episodes of its classes), once:
    python tools/segment_fewshot.py --config-file configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml \
        --weights seg.pth --train-dataset mt_train --steps 400 [--datasets-root ../shared/data]
    # then, for a new defect: K images with their masks in --support, the images to segment in --query
    python tools/segment_fewshot.py --config-file CFG --weights seg.pth --support examples/ --query line2/ \
        --output out/ [--method response] [--threshold 0.5]

Support masks: for each support image ``X.jpg`` (or .bmp, .tif, ...) the mask ``X.png`` beside it (the
magnetic-tile layout), or ``X_mask.png``, or ``--support-masks DIR/X.png``; a pixel is defect when its value is
at least 128. Queries: files, folders (recursive) and glob patterns, as for predict.py. Writes, under --output:
  masks/<id>_<name>.png   the defect mask in the query's pixels (255 = defect)
  overlays/<id>_<name>.png the query with the mask painted (unless --no-overlays)
  areas.csv               one row per query: file, size, defect pixels and fraction, error
  summary.json            counts, the support files, the method and threshold
An unreadable query is reported, skipped and counted; the run then exits 1 unless --allow-skips.
"""
import os
import sys
import time

import _path  # noqa: F401
import cv2
import numpy as np
import torch
from detectron2.utils.logger import setup_logger

from steel_fsd.data import dataset_name, register_datasets
from steel_fsd.data.catalog import require_registered
from steel_fsd.data.errors import DatasetError
from steel_fsd.data.images import read_image
from steel_fsd.engine.setup import build_config
from steel_fsd.fewshot.segmentation import (METHODS, harmonize, load_examples, load_segmenter, save_segmenter,
                                            segment, train_episodes)
from steel_fsd.inference.predict import IMAGE_EXTENSIONS, find_images
from steel_fsd.utils.cli import (UserError, add_config_overrides, check_output_dir, check_output_file, model_parser,
                                 output_lock, run_main, skips_exit_code)
from steel_fsd.utils.io import write_csv, write_image, write_json

MASK_THRESHOLD = 128


def support_pairs(folder: str, masks_folder: str | None) -> list[tuple[str, str]]:
    """(image, mask) files of the support folder; an image without a mask is an error naming it."""
    if not os.path.isdir(folder):
        raise UserError(f"--support {folder} is not a folder", "", "give a folder of images with their masks")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not
                   os.path.splitext(n)[0].endswith("_mask"))
    pairs = []
    for n in names:
        stem, ext = os.path.splitext(n)
        candidates = ([os.path.join(masks_folder, stem + ".png")] if masks_folder else
                      ([os.path.join(folder, stem + ".png")] if ext.lower() != ".png" else []) +
                      [os.path.join(folder, stem + "_mask.png")])
        mask = next((c for c in candidates if os.path.isfile(c)), None)
        if mask is None:
            if not masks_folder and ext.lower() == ".png" and any(
                    os.path.splitext(m)[0] == stem and m != n for m in names):
                continue  # X.png is the mask of X.jpg
            raise UserError(f"--support {os.path.join(folder, n)} has no mask", "",
                            f"put its mask at {' or '.join(candidates)}")
        pairs.append((os.path.join(folder, n), mask))
    if not pairs:
        raise UserError(f"--support {folder} holds no image with a mask", "",
                        f"images ({', '.join(IMAGE_EXTENSIONS)}) with X.png or X_mask.png masks beside them")
    return pairs


def read_support(cfg, pairs):
    images, masks = [], []
    for img_path, mask_path in pairs:
        img = read_image(img_path, cfg.INPUT.FORMAT)
        mask = read_image(mask_path, "L")[:, :, 0] >= MASK_THRESHOLD
        if mask.shape != img.shape[:2]:
            raise UserError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {img_path} is "
                            f"{img.shape[1]}x{img.shape[0]}", "", "give a mask of the image's size")
        if not mask.any():
            raise UserError(f"{mask_path}: no defect pixel (values >= {MASK_THRESHOLD})", "",
                            "each support image must show the defect")
        x, m = harmonize(cfg, img, {1: mask})
        images.append(x)
        masks.append(m[1])
    return torch.stack(images), torch.stack(masks)


def overlay(image_bgr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image_bgr.copy()
    out[mask] = (0.5 * out[mask] + 0.5 * np.array([0, 255, 255])).astype(np.uint8)  # yellow tint
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), 1)
    return out


def train(args, cfg) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from steel_fsd.data.segmentation import images_by_class

    require_registered(args.train_dataset, "--train-dataset", nonempty=True)
    dicts = DatasetCatalog.get(args.train_dataset)
    try:
        examples = load_examples(cfg, dicts)
    except ValueError as e:
        raise UserError(f"--train-dataset {args.train_dataset}: {e}", "", "train on a dataset with masks") from None
    base = images_by_class(dicts)
    names = list(MetadataCatalog.get(args.train_dataset).get("thing_classes", [str(c) for c in sorted(base)]))
    if not base:
        raise UserError(f"--train-dataset {args.train_dataset} has no defect with a mask", "", "")
    from steel_fsd.modeling.fewshot_seg import FewShotSegmenter

    torch.manual_seed(args.seed)
    model = FewShotSegmenter(cfg)
    print(f"[segment_fewshot] training on {args.train_dataset}: {len(dicts)} images, classes "
          f"{[names[c] for c in sorted(base)]}, {args.steps} steps", flush=True)
    train_episodes(model, examples, base, args.steps, seed=args.seed)
    save_segmenter(args.weights, model, trained_on=[names[c] for c in sorted(base)], dataset=args.train_dataset,
                   steps=args.steps)
    print(f"[segment_fewshot] wrote {args.weights}")


def apply(args, cfg) -> int:
    files = find_images(args.query)
    pairs = support_pairs(args.support, args.support_masks)
    try:
        model, meta = load_segmenter(cfg, args.weights)
    except ValueError as e:
        raise UserError(f"--weights {e}", "", "") from None
    support, masks = read_support(cfg, pairs)
    for sub in ("masks",) + (() if args.no_overlays else ("overlays",)):
        os.makedirs(os.path.join(args.output, sub), exist_ok=True)
    rows, skipped, start = [], [], time.perf_counter()
    for i, path in enumerate(files):
        name = f"{i:06d}_{os.path.splitext(os.path.basename(path))[0]}.png"
        try:
            img = read_image(path, cfg.INPUT.FORMAT)
        except DatasetError as e:
            print(f"[segment_fewshot] skipped: {e}", file=sys.stderr, flush=True)
            skipped.append(path)
            rows.append([i, path, "", "", "", "", str(e)])
            continue
        x, _ = harmonize(cfg, img)
        prob = segment(model, args.method, support, masks, x[None])[args.method][0].numpy()
        h, w = img.shape[:2]
        mask = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR) >= args.threshold
        write_image(os.path.join(args.output, "masks", name), (mask * 255).astype(np.uint8))
        if not args.no_overlays:
            bgr = img if cfg.INPUT.FORMAT == "BGR" else img[:, :, ::-1]
            write_image(os.path.join(args.output, "overlays", name), overlay(np.ascontiguousarray(bgr), mask))
        area = int(mask.sum())
        rows.append([i, path, w, h, area, round(area / (w * h), 6), ""])
        el = time.perf_counter() - start
        print(f"[segment_fewshot] {i + 1}/{len(files)} images, ETA {el / (i + 1) * (len(files) - i - 1):.0f} s",
              file=sys.stderr, flush=True)
    write_csv(os.path.join(args.output, "areas.csv"),
              ["image_id", "file", "width", "height", "defect_pixels", "defect_fraction", "error"], rows)
    done = len(files) - len(skipped)
    write_json(os.path.join(args.output, "summary.json"), {
        "images": len(files), "segmented": done, "skipped": len(skipped), "skipped_files": skipped,
        "support": [{"image": a, "mask": b} for a, b in pairs], "method": args.method, "threshold": args.threshold,
        "weights": args.weights, "segmenter": meta, "seconds": round(time.perf_counter() - start, 2)},
        indent=2, sort_keys=False)
    print(f"[segment_fewshot] {done} images segmented from {len(pairs)} support images ({len(skipped)} skipped) "
          f"-> {args.output}")
    return skips_exit_code("segment_fewshot", skipped, "areas.csv", args.allow_skips)


def main(argv=None) -> int:
    ap = model_parser(__doc__, prototypes=None, datasets_root=True)
    ap.add_argument("--train-dataset", help="train a segmenter on this dataset with masks (registered, or "
                    "NAME=FORMAT:PATH[:ANN]) and write it to --weights")
    ap.add_argument("--steps", type=int, default=400, help="training steps of 4 episodes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--support", help="folder of K support images with their masks")
    ap.add_argument("--support-masks", help="folder of the support masks (<image stem>.png), if not beside them")
    ap.add_argument("--query", nargs="+", help="images to segment: files, folders (recursive), glob patterns")
    ap.add_argument("--output", help="output folder")
    ap.add_argument("--method", choices=METHODS, default="response", help="response (the model), average, panet "
                    "(no decoder) or finetune (a head fine-tuned on the support masks)")
    ap.add_argument("--threshold", type=float, default=0.5, help="defect probability threshold")
    ap.add_argument("--no-overlays", action="store_true")
    ap.add_argument("--allow-skips", action="store_true", help="exit 0 even if unreadable images were skipped")
    args = add_config_overrides(ap).parse_args(argv)
    applying = bool(args.support or args.query or args.output)
    if applying and not (args.support and args.query and args.output):
        ap.error("segmenting needs --support, --query and --output together")
    if not (args.train_dataset or applying):
        ap.error("give --train-dataset (train a segmenter) and/or --support, --query and --output (segment)")
    if args.steps < 1 or not 0.0 < args.threshold < 1.0:
        ap.error(f"--steps {args.steps} must be at least 1 and --threshold {args.threshold} in (0, 1)")
    setup_logger(name="steel_fsd")
    cfg = build_config(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    if args.train_dataset:
        register_datasets(args.datasets_root, files=args.datasets_file)
        args.train_dataset = dataset_name(args.train_dataset, "--train-dataset")
        check_output_file(args.weights, "--weights")
        train(args, cfg)
    if not applying:
        return 0
    check_output_dir(args.output, "--output")
    with output_lock(args.output, "--output"):
        return apply(args, cfg)


if __name__ == "__main__":
    sys.exit(run_main(main))
