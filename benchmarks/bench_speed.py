"""Training s/iter and inference s/image of the demo config (R18-FPN, 200 px) and of R50-FPN at 512 px,
measured in one run on the same machine (synthetic NEU data)."""
from __future__ import annotations

import argparse

from common import config, save, synthetic_datasets, time_inference, time_training


SETUPS = {
    "demo_R18_FPN_200px": ("configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml", []),
    "R50_FPN_512px": ("configs/baselines/faster_rcnn_R50_FPN_scratch_GN_neu.yaml",
                      ["DATASETS.TRAIN", "('neu_synth_train',)", "DATASETS.TEST", "('neu_synth_test',)",
                       "SOLVER.IMS_PER_BATCH", "2"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--images", type=int, default=10)
    args = ap.parse_args()
    synthetic_datasets()
    out = {}
    for name, (cfg_file, opts) in SETUPS.items():
        cfg = config(cfg_file, opts + ["OUTPUT_DIR", f"output/bench/{name}"])
        iters = args.iters if "R18" in name else max(3, args.iters // 3)
        out[name] = {"config": cfg_file, "device": cfg.MODEL.DEVICE, "batch": cfg.SOLVER.IMS_PER_BATCH,
                     "input_px": cfg.INPUT.HARMONIZE.RESIZE,
                     "train_s_per_iter": round(time_training(cfg, iters), 3),
                     "inference_s_per_image": round(time_inference(cfg, args.images), 3)}
        print(name, out[name], flush=True)
    save("speed", out)


if __name__ == "__main__":
    main()
