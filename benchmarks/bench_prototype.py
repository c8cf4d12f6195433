"""Prototype head cost, measured in one run against stock Faster R-CNN with the same backbone
(CPU demo size): inference s/image (target overhead <= 5%), training s/iteration (<= 10%), and
register_support wall time for K=10 on all classes vs one epoch of fine-tuning the baseline on
the same support images."""
from __future__ import annotations

import argparse
import math
import os
import time

from common import REPO, config, save, synthetic_datasets, time_inference, time_training

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog

from steel_fsd.fewshot.adapt import register_support
from steel_fsd.engine.trainer import Trainer
from steel_fsd.fewshot.support import sample_support

STOCK = "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml"
PROTO = "configs/demo/proto_R18_FPN_synth_neu.yaml"
SUPPORT = "neu_synth_train"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--shots", type=int, default=10)
    args = ap.parse_args()
    synthetic_datasets()
    out_dir = REPO / "output" / "bench" / "prototype"
    stock = config(STOCK, ["OUTPUT_DIR", str(out_dir / "stock")])
    proto = config(PROTO, ["OUTPUT_DIR", str(out_dir / "proto")])
    res = {"stock_config": STOCK, "prototype_config": PROTO}
    # interleave the two models' measurements so that machine load affects both alike
    for key, fn, n in (("inference_s_per_image", time_inference, args.images), ("train_s_per_iter", time_training, args.iters)):
        a, b = [], []
        for _ in range(2):
            a.append(fn(stock, n))
            b.append(fn(proto, n))
        res[key] = {"stock": round(min(a), 4), "prototype": round(min(b), 4), "ratio": round(min(b) / min(a), 3)}
        print(key, res[key], flush=True)
    # register_support (K shots per class, all classes) vs one fine-tuning epoch over the same support images
    model = Trainer.build_model(proto)
    os.makedirs(out_dir, exist_ok=True)
    DetectionCheckpointer(model, save_dir=str(out_dir)).save("random_init")
    weights = str(out_dir / "random_init.pth")
    start = time.perf_counter()
    ps = register_support(proto, weights, SUPPORT, args.shots, 0, str(out_dir / "protos.pt"), progress=False)
    t_register = time.perf_counter() - start
    n_images = len({p["image_key"] for p in ps.support})
    assert n_images == len({d["image_key"] for d, _ in sample_support(DatasetCatalog.get(SUPPORT), 6, args.shots, 0)})
    iters = math.ceil(n_images / stock.SOLVER.IMS_PER_BATCH)
    t_epoch = iters * res["train_s_per_iter"]["stock"]
    res["register_support"] = {"shots": args.shots, "classes": len(ps.class_names), "support_images": n_images,
                               "seconds": round(t_register, 2), "finetune_epoch_iters": iters,
                               "finetune_epoch_seconds": round(t_epoch, 2), "ratio": round(t_register / t_epoch, 3)}
    save("prototype", res)


if __name__ == "__main__":
    main()
