"""Few-shot evaluation of the CPU prototype models on the synthetic datasets: in-domain (bank prototypes
and support-built prototypes at K = 1, 5, 10) and cross-dataset by prototype swap, NEU -> Severstal and
Severstal -> NEU. Trains (or resumes) the two source models first."""
from __future__ import annotations

import argparse
import os

from common import config, mean_row, save, synthetic_datasets


from steel_fsd.engine.fewshot import kshot_results
from steel_fsd.engine.trainer import Trainer

SOURCES = {  # source model config -> (its test set, {target: (support set, test set)})
    "configs/demo/proto_R18_FPN_synth_neu.yaml": ("neu_synth_test", {
        "neu": ("neu_synth_train", "neu_synth_test"),
        "severstal": ("severstal_synth_tiled_train", "severstal_synth_tiled_test")}),
    "configs/demo/proto_R18_FPN_synth_severstal.yaml": ("severstal_synth_tiled_test", {
        "severstal": ("severstal_synth_tiled_train", "severstal_synth_tiled_test"),
        "neu": ("neu_synth_train", "neu_synth_test")}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    synthetic_datasets()
    out = {}
    for cfg_file, (own_test, targets) in SOURCES.items():
        cfg = config(cfg_file, [])
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=True)
        bank = trainer.train()[own_test]
        weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        row = {"train": list(cfg.DATASETS.TRAIN), "bank_prototypes": {own_test: mean_row(bank, own_test)}}
        for target, (support, test) in targets.items():
            res = kshot_results(cfg, weights, support, test, args.shots, args.seed, os.path.join(cfg.OUTPUT_DIR, "fewshot"))
            row[f"-> {target} ({test})"] = {k: dict(mean_row(r, test), register_s=r["register_s"]) for k, r in res.items()}
        out[cfg_file] = row
    save("fewshot_synth", {"seed": args.seed, "shots": args.shots, "results": out})


if __name__ == "__main__":
    main()
