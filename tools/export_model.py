#!/usr/bin/env python
"""Export a trained model (and its prototype file) for deployment: TorchScript, and ONNX where supported.

    python tools/export_model.py --config-file CFG --weights W.pth [--prototypes P.pt] --output DIR \
        [--format torchscript onnx] [--sample-image IMG]

Writes DIR/model.ts (``torch.jit.load``-able: input one harmonized CHW uint8 image, outputs boxes XYXY,
classes, scores and the image size), DIR/model.onnx when asked and supported, and DIR/export.json: the
classes, the harmonization the caller must apply first (CLAHE, resize), the input format and the check that
the exported model's boxes equal the eager model's on the sample image.
"""
import io
import os
import sys

import _path  # noqa: F401
import numpy as np
import torch
from detectron2.utils.logger import setup_logger

from steel_fsd.data.images import read_image
from steel_fsd.inference.export import export_onnx, trace_model
from steel_fsd.inference.predict import Predictor
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.utils.cli import add_config_overrides, check_output_dir, model_parser, run_main
from steel_fsd.utils.io import write_bytes, write_json


def main(argv=None) -> int:
    ap = model_parser(__doc__, prototypes="prototype file: baked into the exported model")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--format", nargs="+", choices=["torchscript", "onnx"], default=["torchscript"])
    ap.add_argument("--sample-image", help="image to trace with and check on (default: random pixels)")
    args = add_config_overrides(ap).parse_args(argv)
    setup_logger(name="steel_fsd")
    check_output_dir(args.output, "--output")
    cfg = build_config(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", args.output])
    finalize_config(cfg, datasets=(), weights=args.weights, swap=bool(args.prototypes))
    predictor = Predictor.from_files(cfg, args.weights, args.prototypes)
    if args.sample_image:
        sample = read_image(args.sample_image, cfg.INPUT.FORMAT)
    else:
        sample = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    image = predictor.harmonize(sample)
    model = predictor.model
    record = {"classes": predictor.class_names, "input": {"format": cfg.INPUT.FORMAT, "layout": "CHW uint8",
              "harmonize": {"clahe": cfg.INPUT.HARMONIZE.CLAHE, "clahe_clip": cfg.INPUT.HARMONIZE.CLAHE_CLIP,
                            "clahe_tiles": cfg.INPUT.HARMONIZE.CLAHE_TILES, "resize": cfg.INPUT.HARMONIZE.RESIZE,
                            "resize_policy": cfg.INPUT.HARMONIZE.RESIZE_POLICY},
              "traced_size": list(image.shape[1:])},
              "outputs": ["boxes XYXY (N, 4)", "classes (N,)", "scores (N,)", "image size (2,)"],
              "weights": args.weights, "prototypes": args.prototypes, "files": {}}
    with torch.no_grad():
        ref = model.inference([{"image": image}], do_postprocess=False)[0]
    if "torchscript" in args.format:
        traced, _ = trace_model(model, image)
        path = os.path.join(args.output, "model.ts")
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        write_bytes(path, buf.getvalue())  # atomic: no half-written model.ts, a symlink is replaced
        boxes, classes, scores, _ = torch.jit.load(path)(image)
        diff = float((boxes - ref.pred_boxes.tensor).abs().max()) if len(boxes) == len(ref) and len(ref) else 0.0
        record["files"]["torchscript"] = path
        record["check"] = {"detections": len(ref), "same_count": len(boxes) == len(ref),
                           "same_classes": bool(torch.equal(classes, ref.pred_classes)) if len(boxes) == len(ref) else False,
                           "max_box_diff": diff}
        print(f"[export] {path}: {len(boxes)} detections on the sample, max box difference to eager {diff:.2e}")
    if "onnx" in args.format:
        path = os.path.join(args.output, "model.onnx")
        try:
            export_onnx(model, image, path)
            record["files"]["onnx"] = path
            print(f"[export] {path}")
        except RuntimeError as e:
            record["onnx_error"] = str(e)
            print(f"[export] {e}", file=sys.stderr)
    write_json(os.path.join(args.output, "export.json"), record, indent=2, sort_keys=False)
    return 0 if "onnx_error" not in record else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
