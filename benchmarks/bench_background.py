"""Background design of the prototype head, measured: the learned background logit (default) against a
learned background prototype, same seed, data and schedule (CPU demo model at 128 px, from scratch)."""
from __future__ import annotations

import argparse

import torch
from common import config, save, synthetic_datasets

from detectron2.utils.events import EventStorage

from steel_fsd.engine.trainer import Trainer

CFG = "configs/demo/proto_R18_FPN_synth_neu.yaml"


def train(background: str, iters: int) -> list[dict]:
    """Train ``iters`` iterations; every 20, the latest loss_cls, tau and (fg) classification accuracy."""
    cfg = config(CFG, ["MODEL.PROTOTYPE.BACKGROUND", background, "INPUT.HARMONIZE.RESIZE", "128",
                       "SOLVER.WARMUP_ITERS", "10", "OUTPUT_DIR", f"output/bench/background_{background}"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    opt, loader = Trainer.build_optimizer(cfg, model), iter(Trainer.build_train_loader(cfg))
    sched = Trainer.build_lr_scheduler(cfg, opt)
    curve = []
    with EventStorage() as storage:
        for i in range(iters):
            storage.iter = i
            losses = model(next(loader))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            sched.step()
            if (i + 1) % 20 == 0:
                h = storage.latest()
                curve.append({"iter": i + 1, "loss_cls": round(float(losses["loss_cls"]), 3),
                              "tau": round(h["prototype/tau"][0], 2),
                              "cls_accuracy": round(h["fast_rcnn/cls_accuracy"][0], 3),
                              "fg_cls_accuracy": round(h.get("fast_rcnn/fg_cls_accuracy", (0.0,))[0], 3)})
                print(background, curve[-1], flush=True)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=120)
    args = ap.parse_args()
    synthetic_datasets()
    save("background", {"config": CFG, "input_px": 128, "curves": {b: train(b, args.iters) for b in ("logit", "prototype")}})


if __name__ == "__main__":
    main()
