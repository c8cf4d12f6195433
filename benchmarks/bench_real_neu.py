"""Train and evaluate configs on the real NEU-DET images (../shared/data/neu-det) at CPU size.

Each config trains from scratch on neu_train and is evaluated on neu_test (the seeded 70/15/15
split); runs resume from their OUTPUT_DIR, so an interrupted benchmark continues.
"""
from __future__ import annotations

import argparse
import os

from common import REPO, mean_row, save, train_and_evaluate

DEFAULT_CONFIGS = ["configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml",
                   "configs/prototype/proto_R18_FPN_GN_neu_cpu.yaml"]
SHOTS = [1, 5, 10]


def run(config_file: str, opts: list[str], seed: int) -> dict:
    """Train (resuming) and evaluate on neu_test; prototype models also with K-shot support prototypes."""
    from steel_fsd.engine.fewshot import kshot_results

    out, cfg = train_and_evaluate(config_file, opts)
    if cfg.MODEL.ROI_HEADS.NAME == "PrototypeROIHeads":  # support-built prototypes instead of the bank
        weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        kshot = kshot_results(cfg, weights, "neu_train", "neu_test", SHOTS, seed, cfg.OUTPUT_DIR)
        out["support_prototypes"] = {k: {"seed": seed, "register_s": r["register_s"], "mean": mean_row(r, "neu_test")}
                                     for k, r in kshot.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder holding neu-det/")
    ap.add_argument("--name", default="real_neu")
    ap.add_argument("--seed", type=int, default=0, help="support sampling seed")
    ap.add_argument("opts", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.data, "neu-det")):
        raise SystemExit(f"{args.data}/neu-det not found: pass --data DIR holding the NEU-DET download")
    from steel_fsd.data import register_all
    register_all(args.data)
    save(args.name, {"data": args.data, "runs": [run(c, args.opts, args.seed) for c in args.configs]})


if __name__ == "__main__":
    main()
