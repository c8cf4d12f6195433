"""Inspection-time throughput: images/s through steel_fsd.inference.predict.Predictor (harmonization, batching,
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
prototype / stock ratio per setting, then the speed options of the predictor (mixed precision, channels_last,
prefetching threads) on the demo model.

    python benchmarks/bench_inference.py --gpu-check [--compile] --out OUT.json   # the GPU rows

``--gpu-check`` measures what a user runs on a GPU: the shipped R50-FPN GroupNorm configs (stock and
prototype) at 512 px, batch 1, 8 and 32, float32 against bfloat16 autocast, with channels_last and two
prefetching threads (harmonization and pinned host copies off the critical path), and with ``--compile`` a
``torch.compile``-d backbone. Every row reports images/s over a stream of batches and the per-batch latency
percentiles (p50 / p90 / p99 of the time between batch completions).
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
# --gpu-check: the shipped R50 configs a GPU user trains (benchmarks/gpu_real_neu.sh), each head its own config
GPU_CONFIGS = {"stock": "configs/baselines/faster_rcnn_R50_FPN_scratch_GN_neu.yaml",
               "prototype": "configs/prototype/proto_R50_FPN_scratch_GN_neu.yaml"}


def build_predictor(config: str, size: int, batch: int, device: str, tile="auto", opts=(), **speed):
    from detectron2.modeling import build_model

    from steel_fsd.inference.predict import Predictor
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
                     batch_size=batch, **speed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stream(predictor, images: list[np.ndarray], device: str) -> list[float]:
    """Predict ``images`` as a stream of batches (the next batches prepared by the predictor's prefetching
    threads, if any, as in :func:`~steel_fsd.inference.predict.predict_paths`); the seconds between batch
    completions, the first measured from the start."""
    from steel_fsd.inference.predict import prefetched

    batches = [images[i:i + predictor.batch_size] for i in range(0, len(images), predictor.batch_size)]
    prepared = (prefetched(predictor.prepare, batches, predictor.prefetch) if predictor.prefetch
                else map(predictor.prepare, batches))
    _sync(device)
    last, gaps = time.perf_counter(), []
    for batch, inputs in zip(batches, prepared):
        predictor.run(batch, inputs)
        _sync(device)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps


def seconds(predictor, images: list[np.ndarray], device: str) -> float:
    return sum(stream(predictor, images, device))


def compare(predictors: dict, images: list[np.ndarray], device: str, rounds: int) -> dict[str, float]:
    """Median images/s of each predictor, timed in alternation (round r: each in turn) after one warm-up
    batch each, so that load from other processes hits every predictor alike."""
    return {k: v["images_per_s"] for k, v in measure(predictors, images, device, rounds).items()}


def measure(predictors: dict, images: list[np.ndarray], device: str, rounds: int, warmup: int = 1) -> dict:
    """Per predictor: images/s (median over ``rounds`` streams, predictors in alternation after ``warmup``
    warm-up batches each) and the latency percentiles of its batches over all rounds (ms)."""
    for p in predictors.values():
        for _ in range(warmup):
            p(images[:p.batch_size])
    gaps: dict[str, list[list[float]]] = {k: [] for k in predictors}
    for _ in range(rounds):
        for k, p in predictors.items():
            gaps[k].append(stream(p, images, device))
    out = {}
    for k, runs in gaps.items():
        flat = np.array([g for run in runs for g in run]) * 1000
        out[k] = {"images_per_s": round(len(images) / float(np.median([sum(r) for r in runs])), 2),
                  "latency_ms": {f"p{q}": round(float(np.percentile(flat, q)), 2) for q in (50, 90, 99)}}
    return out


def speed_options(images, device: str, rounds: int) -> list[dict]:
    """The demo prototype model at 200 px, batch 8: float32 against each speed option, in alternation."""
    base = MODELS["R18_FPN"]
    options = {"float32": {}, "bfloat16": {"amp": "bfloat16"}, "channels_last": {"channels_last": True},
               "prefetch 1": {"prefetch": 1}}
    res = measure({k: build_predictor(base, 200, 8, device, **o) for k, o in options.items()}, images, device, rounds)
    ref = res["float32"]["images_per_s"]
    return [{"model": "R18_FPN prototype", "px": 200, "batch": 8, "option": k, **v,
             "over_float32": round(v["images_per_s"] / ref, 3)} for k, v in res.items()]


def gpu_check(images, device: str, rounds: int, compile_backbone: bool, batches=(1, 8, 32), px: int = 512) -> list[dict]:
    """The shipped R50 GN configs at 512 px: batch 1 / 8 / 32, float32 and bfloat16 (float16 where the GPU has
    no bfloat16), then bfloat16 + channels_last + 2 prefetching threads, for both heads in alternation;
    with ``compile_backbone`` also that last setting with a ``torch.compile``-d backbone."""
    options = {"float32": {}, "amp": {"amp": "bfloat16"},
               "amp+channels_last+prefetch": {"amp": "bfloat16", "channels_last": True, "prefetch": 2}}
    rows = []
    for batch in batches:
        predictors = {}
        for head, config in GPU_CONFIGS.items():
            for name, o in options.items():
                predictors[(head, name)] = build_predictor(config, px, batch, device, **o)
            if compile_backbone:
                p = build_predictor(config, px, batch, device, **options["amp+channels_last+prefetch"])
                try:
                    p.model.backbone = torch.compile(p.model.backbone, dynamic=False)
                    p(images[:batch])  # compiles (slow, once): not timed
                    predictors[(head, "amp+channels_last+prefetch+compile")] = p
                except Exception as e:  # noqa: BLE001 - report, do not fail the other rows
                    rows.append({"head": head, "batch": batch, "option": "+compile", "status": f"failed: {e!r}"[:300]})
        n = max(4 * batch, 32)
        res = measure(predictors, (images * (n // len(images) + 1))[:n], device, rounds, warmup=2)
        for (head, name), v in res.items():
            rows.append({"head": head, "px": px, "batch": batch, "option": name, **v})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16, help="images per row (a multiple of 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per predictor (median reported)")
    ap.add_argument("--quick", action="store_true", help="R18 at 200 px only")
    ap.add_argument("--gpu-check", action="store_true", help="the shipped R50 configs at 512 px, batch 1/8/32, "
                                                             "float32 / bfloat16 / channels_last + prefetch")
    ap.add_argument("--compile", action="store_true", help="--gpu-check: also a torch.compile-d backbone")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="--gpu-check batch sizes")
    ap.add_argument("--px", type=int, default=512, help="--gpu-check input size (smaller for a CPU smoke run)")
    ap.add_argument("--out", help="results file (default benchmarks/results/inference.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from steel_fsd.synthetic.generators import render_neu_image, render_severstal_image

    gray3 = lambda a: np.repeat(a[:, :, None], 3, axis=2)  # noqa: E731  (BGR input, as read_image gives)
    images = [gray3(render_neu_image(0, i % 6, i // 6 + 1).image) for i in range(args.images)]
    meta = {"device": args.device, "threads": args.threads, "images_per_row": args.images, "rounds": args.rounds,
            "weights": "random init, score threshold 0 (every image keeps its maximum detections)"}
    if args.gpu_check:
        rows = gpu_check(images, args.device, args.rounds, args.compile, args.batches, args.px)
        finish(args.out, "gpu_inference", {"configs": GPU_CONFIGS, **meta, "timing": (
            "images/s: median over the rounds of a stream of batches (every predictor in alternation); latency: "
            "percentiles of the time between batch completions"), "rows": rows})
        return
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
    options = speed_options(images, args.device, args.rounds)
    for row in options:
        print(row, flush=True)
    finish(args.out, "inference", {"configs": MODELS, "stock_overrides": STOCK, **meta,
                                   "timing": "median of the rounds, stock and prototype in alternation",
                                   "rows": rows, "speed_options": options})


def finish(out: str | None, name: str, result: dict) -> None:
    if out is None:
        save(name, result)
        return
    import json
    from pathlib import Path

    from common import machine

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
