"""Train and evaluate configs on the real NEU-DET images (../shared/data/neu-det) at CPU size.

Each config trains from scratch on neu_train and is evaluated on neu_test (the seeded 70/15/15
split); runs resume from their OUTPUT_DIR, so an interrupted benchmark continues.
"""
from __future__ import annotations

import argparse
import os
import time

from common import REPO, save

DEFAULT_CONFIGS = ["configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml"]


def run(config_file: str, opts: list[str]) -> dict:
    from detectron2.utils.logger import setup_logger

    from steel_fsd.engine.setup import build_config, finalize_config
    from steel_fsd.engine.trainer import Trainer
    from steel_fsd.evaluation.report import per_class_rows

    cfg = build_config(str(REPO / config_file), opts)
    for name in ("detectron2", "fvcore", "steel_fsd"):
        setup_logger(cfg.OUTPUT_DIR, name=name)
    finalize_config(cfg)
    start = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    results = trainer.train()["neu_test"]
    from detectron2.data import MetadataCatalog
    rows = per_class_rows(results, MetadataCatalog.get("neu_test").thing_classes)
    return {"config": config_file, "iterations": cfg.SOLVER.MAX_ITER, "batch": cfg.SOLVER.IMS_PER_BATCH,
            "input_px": cfg.INPUT.HARMONIZE.RESIZE, "wall_s_this_run": round(time.time() - start),
            "mean": rows[-1], "per_class": rows[:-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder holding neu-det/")
    ap.add_argument("--name", default="real_neu")
    ap.add_argument("opts", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.data, "neu-det")):
        raise SystemExit(f"{args.data}/neu-det not found: pass --data DIR holding the NEU-DET download")
    os.environ["STEEL_FSD_DATASETS"] = args.data  # read when steel_fsd.data registers the datasets
    import steel_fsd  # noqa: F401
    save(args.name, {"data": args.data, "runs": [run(c, args.opts) for c in args.configs]})


if __name__ == "__main__":
    main()
