#!/usr/bin/env python
"""`make demo`: synthetic data -> register -> train the CPU demo model -> evaluate -> table + overlay PNG
-> few-shot step: K=5 synthetic Severstal supports -> prototype swap -> evaluate on Severstal, no retraining.

Re-running resumes: existing synthetic data and a finished checkpoint are reused.
Writes OUTPUT_DIR/results.json (every printed metric, also copied to benchmarks/results/demo.json, the file the
README's demo table quotes), OUTPUT_DIR/predictions.png, the model and the prototype file.
"""
import argparse
import os
import subprocess
import sys
import time

import _path  # noqa: F401
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

from steel_fsd.data import register_all
from steel_fsd.data.catalog import datasets_root
from steel_fsd.fewshot.adapt import evaluate_with_support, register_support
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.data.mapper import SteelDatasetMapper
from steel_fsd.engine.trainer import Trainer
from steel_fsd.evaluation.report import format_table, image_level_line, per_class_rows
from steel_fsd.utils.cli import run_main
from steel_fsd.utils.io import write_json
from steel_fsd.visualize import draw_predictions, grid

DEFAULT_CONFIG = "configs/demo/proto_R18_FPN_synth_neu.yaml"
FEWSHOT_SUPPORT, FEWSHOT_TEST, FEWSHOT_K = "severstal_synth_tiled_train", "severstal_synth_tiled_test", 5


def make_data(root: str, seed: int) -> None:
    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_synthetic.py")
    subprocess.run([sys.executable, tool, "--out", root, "--seed", str(seed)], check=True)


def one_per_class(dicts: list[dict], n: int) -> list[dict]:
    """The first image holding each class (in class order), topped up to ``n`` images."""
    picked: list[dict] = []
    for c in sorted({a["category_id"] for d in dicts for a in d["annotations"]}):
        first = next((d for d in dicts if d not in picked and any(a["category_id"] == c for a in d["annotations"])), None)
        picked += [first] if first is not None else []
    return (picked + [d for d in dicts if d not in picked])[:n]


def save_overlays(cfg, model, dataset_name: str, path: str, n: int = 6) -> None:
    dicts = one_per_class(DatasetCatalog.get(dataset_name), n)
    meta = MetadataCatalog.get(dataset_name)
    mapper = SteelDatasetMapper(cfg, is_train=False)  # the same mapper as evaluation
    model.eval()
    images = []
    with torch.no_grad():
        for d in dicts:
            out = model([mapper(d)])[0]["instances"]
            images.append(draw_predictions(d, out, meta, cfg.TEST.PRF_SCORE_THRESH))
    import cv2
    cv2.imwrite(path, grid(images)[:, :, ::-1])


def fewshot_step(cfg, seed: int) -> dict:
    """Register K synthetic Severstal supports with the NEU-trained model and evaluate by prototype swap."""
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    protos = os.path.join(cfg.OUTPUT_DIR, f"protos_{FEWSHOT_SUPPORT}_K{FEWSHOT_K}.pt")
    register_support(cfg, weights, FEWSHOT_SUPPORT, FEWSHOT_K, seed, protos, progress=False)
    results = evaluate_with_support(cfg, weights, protos, [FEWSHOT_TEST])
    classes = MetadataCatalog.get(FEWSHOT_TEST).thing_classes
    print(f"\nFew-shot, cross-dataset: trained on {cfg.DATASETS.TRAIN[0]}, K={FEWSHOT_K} supports per class from "
          f"{FEWSHOT_SUPPORT} (prototype swap, no retraining), evaluated on {FEWSHOT_TEST}:")
    print(format_table(per_class_rows(results[FEWSHOT_TEST], classes)))
    line = image_level_line(results[FEWSHOT_TEST])  # Severstal tiles include defect-free ones
    if line:
        print(line)
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", default=DEFAULT_CONFIG)
    ap.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    ap.add_argument("--record", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "benchmarks", "results", "demo.json"),
                    help="also write the results here (the file the README's demo table quotes; '' to skip)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = ap.parse_args(argv)
    t0 = time.time()
    root = datasets_root()
    make_data(root, args.seed)
    register_all(root)
    cfg = build_config(args.config_file, args.opts)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    for name in ("detectron2", "fvcore", "steel_fsd"):
        setup_logger(cfg.OUTPUT_DIR, name=name)
    finalize_config(cfg)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    results = trainer.train()
    test_name = cfg.DATASETS.TEST[0]
    classes = MetadataCatalog.get(test_name).thing_classes
    rows = per_class_rows(results[test_name], classes)
    print(f"\nSynthetic NEU test split ({test_name}), {cfg.SOLVER.MAX_ITER} iterations of {args.config_file}:")
    print(format_table(rows))
    if cfg.MODEL.ROI_HEADS.NAME == "PrototypeROIHeads":
        results.update(fewshot_step(cfg, args.seed))
    png = os.path.join(cfg.OUTPUT_DIR, "predictions.png")
    save_overlays(cfg, trainer.model, test_name, png)
    summary = {"config": args.config_file, "iterations": cfg.SOLVER.MAX_ITER, "wall_time_s": round(time.time() - t0, 1),
               "datasets": {name: {"per_class": per_class_rows(res, MetadataCatalog.get(name).thing_classes),
                                   "metrics": res} for name, res in results.items()},
               "overlay_png": png}
    write_json(os.path.join(cfg.OUTPUT_DIR, "results.json"), summary, indent=2, sort_keys=False)
    if args.record:
        record = dict(summary, command="make demo", threads=torch.get_num_threads(),
                      overlay_png=os.path.relpath(png, os.getcwd()))
        write_json(args.record, record, indent=2, sort_keys=False)
    print(f"overlay: {png}\nresults: {os.path.join(cfg.OUTPUT_DIR, 'results.json')}  ({summary['wall_time_s']} s)")
    return summary


if __name__ == "__main__":
    sys.exit(run_main(main))
