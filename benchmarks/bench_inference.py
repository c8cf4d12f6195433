"""Inspection-time throughput: images/s through steel_fsd.engine.predict.Predictor (harmonization, batching,
model, tiling) for the demo R18-FPN and an R50-FPN, at 200 and 512 px, batch 1 and 8, stock against the
prototype head (the same config with either ROI head), all in one run on one machine (so the ratios are
comparable).

    python benchmarks/bench_inference.py [--images 16] [--threads 2] [--device cpu|cuda]
    python benchmarks/bench_inference.py --quick      # demo size only (200 px), a smoke run

Models are randomly initialized (no weights can be downloaded; the cost of a forward pass does not depend on
the weights, but the number of boxes after the score threshold does, so the threshold is set to 0 and every
image keeps TEST.DETECTIONS_PER_IMAGE detections: the slowest case). Images are synthetic 200x200 NEU-like
pictures; a Severstal-size row (1600x256 strips, tiled into 256-pixel squares) is measured for the demo model.
Stock and prototype predictors are timed in alternation (median of ``--rounds`` passes each) so that other
load on the machine hits both alike. Writes benchmarks/results/inference.json with images/s per row and the
prototype / stock ratio per setting.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import REPO, save

# The prototype configs; the stock row is the same config with Detectron2's StandardROIHeads, so that the heads
# are the only difference (backbone, box head, RPN and test settings equal).
MODELS = {"R18_FPN": "configs/demo/proto_R18_FPN_synth_neu.yaml", "R50_FPN": "configs/prototype/proto_R50_FPN_neu.yaml"}
STOCK = ["MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "False"]


def build_predictor(config: str, size: int, batch: int, device: str, tile="auto", opts=()):
    from detectron2.modeling import build_model

    from steel_fsd.engine.predict import Predictor
    from steel_fsd.engine.setup import build_config

    cfg = build_config(str(REPO / config), ["INPUT.HARMONIZE.RESIZE", str(size), "INPUT.HARMONIZE.NORMALIZE", "False",
                                            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.DEVICE", device,
                                            "MODEL.WEIGHTS", "", *opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    if cfg.MODEL.ROI_HEADS.NAME == "PrototypeROIHeads":  # inference uses the (filled) bank or support prototypes
        pred = model.roi_heads.box_predictor
        pred.set_support(torch.nn.functional.normalize(torch.randn(cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                                                                   pred.embed.out_features), dim=1))
    return Predictor(cfg, model, [str(i) for i in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)], tile=tile,
                     batch_size=batch)


def seconds(predictor, images: list[np.ndarray], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(images), predictor.batch_size):
        predictor(images[i:i + predictor.batch_size])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(predictors: dict, images: list[np.ndarray], device: str, rounds: int) -> dict[str, float]:
    """Median images/s of each predictor, timed in alternation (round r: each in turn) after one warm-up
    batch each, so that load from other processes hits every predictor alike."""
    for p in predictors.values():
        p(images[:p.batch_size])
    times: dict[str, list[float]] = {k: [] for k in predictors}
    for _ in range(rounds):
        for k, p in predictors.items():
            times[k].append(seconds(p, images, device))
    return {k: len(images) / float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16, help="images per row (a multiple of 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per predictor (median reported)")
    ap.add_argument("--quick", action="store_true", help="R18 at 200 px only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from steel_fsd.synthetic.generators import render_neu_image, render_severstal_image

    gray3 = lambda a: np.repeat(a[:, :, None], 3, axis=2)  # noqa: E731  (BGR input, as read_image gives)
    images = [gray3(render_neu_image(0, i % 6, i // 6 + 1).image) for i in range(args.images)]
    strips = [gray3(render_severstal_image(0, i, (1 + i % 4,)).image) for i in range(8)]
    rows = []
    models = {"R18_FPN": MODELS["R18_FPN"]} if args.quick else MODELS
    sizes = (200,) if args.quick else (200, 512)
    for name, config in models.items():
        for size in sizes:
            for batch in (1, 8):
                ips = compare({"stock": build_predictor(config, size, batch, args.device, opts=STOCK),
                               "prototype": build_predictor(config, size, batch, args.device)},
                              images, args.device, args.rounds)
                rows.append({"model": name, "px": size, "batch": batch, "stock_images_per_s": round(ips["stock"], 2),
                             "prototype_images_per_s": round(ips["prototype"], 2),
                             "prototype_over_stock": round(ips["prototype"] / ips["stock"], 3)})
                print(rows[-1], flush=True)
    ips = compare({"stock": build_predictor(MODELS["R18_FPN"], 200, 8, args.device, opts=STOCK)}, strips,
                  args.device, args.rounds)
    rows.append({"model": "R18_FPN", "px": "1600x256 strips (7 tiles of 256 -> 200 px)", "batch": 8,
                 "stock_images_per_s": round(ips["stock"], 2), "tiles_per_s": round(7 * ips["stock"], 2)})
    print(rows[-1], flush=True)
    save("inference", {"configs": MODELS, "stock_overrides": STOCK, "device": args.device, "threads": args.threads, "images_per_row": args.images,
                       "rounds": args.rounds, "timing": "median of the rounds, stock and prototype in alternation",
                       "weights": "random init, score threshold 0 (every image keeps its maximum detections)",
                       "rows": rows})


if __name__ == "__main__":
    main()
