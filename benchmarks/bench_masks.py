#!/usr/bin/env python
"""Instance masks in the detector: bbox and segm AP of the mask configs, and what the mask branch costs the boxes.

    python benchmarks/bench_masks.py --data ../shared/data [--runs mt severstal mt_proto neu_mt neu_mt_boxes]
        [--jobs 2]

Each run trains a config of ``configs/masks/`` with ``tools/train_net.py`` (resumable, one thread, output under
``output/masks/<run>``) and reads its final evaluation on the config's test split. ``neu_mt`` (NEU-DET box-only
images beside the magnetic tiles' masks) and ``neu_mt_boxes`` (the same without the mask branch) measure the mask
branch's cost on NEU-DET's boxes: the mean bbox AP50 over the six NEU-DET classes of the union's test split.
Writes ``benchmarks/results/masks.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "output" / "masks"
NEU = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
# run -> (config, overrides)
RUNS = {
    "mt": ("configs/masks/mask_rcnn_R18_FPN_GN_mt_cpu.yaml", []),
    "severstal": ("configs/masks/mask_rcnn_R18_FPN_GN_severstal_cpu.yaml", []),
    "mt_proto": ("configs/masks/proto_mask_R18_FPN_GN_mt_cpu.yaml", []),
    "neu_mt": ("configs/masks/mask_rcnn_R18_FPN_GN_neu_mt_cpu.yaml", []),
    "neu_mt_boxes": ("configs/masks/mask_rcnn_R18_FPN_GN_neu_mt_cpu.yaml", ["MODEL.MASK_ON", "False"]),
}


def run_dir(run: str) -> Path:
    return OUT / (Path(RUNS[run][0]).stem + (f"+{run}" if RUNS[run][1] else ""))


def train(run: str, data: str) -> int:
    config, opts = RUNS[run]
    out = run_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(out.with_suffix(".log"), "a") as log:
        return subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(REPO / config),
                               "--datasets-root", data, "--resume", *opts, "OUTPUT_DIR", str(out)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode


def final_eval(out: Path) -> dict:
    """The last evaluation in Detectron2's metrics.json (keys ``bbox/AP50``, ``segm/AP``, ...)."""
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "bbox/AP" in r]
    if not evals:
        raise RuntimeError(f"{out}: no evaluation in metrics.json (did the run finish?)")
    return evals[-1]


def record(run: str) -> dict:
    out = run_dir(run)
    ev = final_eval(out)
    m = re.search(r"Total training time: (\d+):(\d\d):(\d\d)", (out / "log.txt").read_text())
    rec = {"run": run, "config": RUNS[run][0], "opts": RUNS[run][1], "iteration": ev.get("iteration"),
           "train_minutes": round((int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])) / 60, 1) if m else None}
    for task in ("bbox", "segm"):
        if f"{task}/AP" in ev:
            rec[task] = {k: round(ev[f"{task}/{k}"], 2) for k in ("AP", "AP50", "AP75")}
            rec[task]["AP50_per_class"] = {k.split("-", 1)[1]: round(v, 2) for k, v in ev.items()
                                           if k.startswith(f"{task}/AP50-")}
    neu = [rec["bbox"]["AP50_per_class"][c] for c in NEU if c in rec["bbox"]["AP50_per_class"]]
    if len(neu) == len(NEU):
        rec["bbox"]["AP50_neu_classes"] = round(sum(neu) / len(neu), 2)
    return rec


def main(argv=None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--out", default=str(OUT), help="runs' folder (default output/masks)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    OUT = Path(args.out)
    if not args.report_only:
        todo = [r for r in args.runs if not (run_dir(r) / "model_final.pth").is_file()]
        print(f"[bench_masks] {len(todo)} runs to train: {todo}", flush=True)
        with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
            for run, rc in zip(todo, pool.map(lambda r: train(r, args.data), todo)):
                print(f"[bench_masks] {run}: {'ok' if rc == 0 else f'FAILED rc={rc}'}", flush=True)
    recs = [record(r) for r in RUNS if (run_dir(r) / "metrics.json").is_file() and
            any("bbox/AP" in line for line in (run_dir(r) / "metrics.json").read_text().splitlines())]
    result = {"data": args.data, "runs": recs}
    by = {r["run"]: r for r in recs}
    if "neu_mt" in by and "neu_mt_boxes" in by:
        result["mask_branch_cost_neu_AP50"] = round(by["neu_mt_boxes"]["bbox"]["AP50_neu_classes"]
                                                    - by["neu_mt"]["bbox"]["AP50_neu_classes"], 2)
    sys.path.insert(0, str(Path(__file__).parent))
    from common import save

    save("masks", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
