"""Pretraining without downloads, measured: scratch vs SimCLR vs NNCLR vs supervised backbones, each then
trained into the stock and the prototype detector at the same schedule on real NEU-DET.

    python benchmarks/bench_pretrain.py --methods simclr nnclr supervised --epochs 10 --iters 2500 \
        --seeds 0 1 --jobs 2                          # resumable; every stage skips what is done
    python benchmarks/bench_pretrain.py --report-only

Stage 1 pretrains the R18-FPN-GN backbone of ``configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml`` with
``tools/pretrain_backbone.py`` on the ``neu_train`` images only (never the val or test pixels; ``supervised``
uses neu_train's image-level labels), one method after another, writing ``output/pretrain/r18_<method>.pth``
and its record (per-epoch loss, linear-probe accuracy, seconds). Stage 2 trains the rows ``default`` and
``proto_default`` of ``benchmarks/bench_recipe.py`` from each backbone (``--weights``), with the same
iterations and seeds as the scratch rows it is compared with. Stage 3 writes
``benchmarks/results/pretrain_neu.json``: per method the pretraining wall time and probe accuracy, and per
(method, head) the neu_val / neu_test rows (mean +- 95% CI over seeds) beside the scratch row at the same
iterations, if that has been run (``bench_recipe.py --rows default proto_default --iters N``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml"
METHODS = ("simclr", "nnclr", "supervised")
HEADS = ("default", "proto_default")


def weights_path(method: str) -> Path:
    return REPO / "output" / "pretrain" / f"r18_{method}.pth"


def pretrain_stage(method: str, epochs: int, data: str, threads: int, crop: int = 0) -> None:
    out = weights_path(method)
    record = Path(str(out) + ".json")
    if out.is_file() and record.is_file() and len(json.loads(record.read_text()).get("history", [])) >= epochs:
        print(f"[bench_pretrain] {out} done", flush=True)
        return
    cmd = [sys.executable, str(REPO / "tools" / "pretrain_backbone.py"), "--config-file", str(REPO / CONFIG),
           "--datasets", "neu_train", "--method", method, "--epochs", str(epochs), "--out", str(out), "--crop", str(crop)]
    env = dict(os.environ, STEEL_FSD_DATASETS=data, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"[bench_pretrain] {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def detector_stage(method: str, iters: int, seeds: list[int], jobs: int, data: str) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_recipe.py"), "--rows", *HEADS, "--iters", str(iters),
           "--seeds", *map(str, seeds), "--jobs", str(jobs), "--data", data, "--weights", str(weights_path(method))]
    print(f"[bench_pretrain] {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def report(iters: int) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_recipe
    from common import save

    runs = bench_recipe.finished(iters)
    rows = {r["row"]: r for r in bench_recipe.summarize(runs)}
    out = {"iterations_at_batch4": iters, "config": CONFIG, "pretraining_data": "neu_train images only",
           "methods": {}, "rows": []}
    for method in ("scratch",) + METHODS:
        if method != "scratch":
            rec = Path(str(weights_path(method)) + ".json")
            if not rec.is_file():
                continue
            r = json.loads(rec.read_text())
            h = r.get("history", [])
            out["methods"][method] = {"seconds": round(sum(e["seconds"] for e in h), 1), "epochs": len(h),
                                      "images": r.get("images"), "final_loss": h[-1]["loss"] if h else None,
                                      # records before multi-source pretraining: probe_acc[_init]
                                      "probe_accuracy_init": (r.get("probe_init") or {}).get("train",
                                                                                            r.get("probe_acc_init")),
                                      "probe_accuracy": [e.get("probe", {}).get("train", e.get("probe_acc"))
                                                         for e in h],
                                      "record": str(rec.relative_to(REPO))}
        for head in HEADS:
            name = head if method == "scratch" else bench_recipe.row_name(head, str(weights_path(method)))
            if name in rows:
                out["rows"].append({"method": method, "head": head, **rows[name]})
    save("pretrain_neu", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iters", type=int, default=2500, help="detector iterations at batch 4 (as the scratch rows)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="pretraining threads")
    ap.add_argument("--crop", type=int, default=0, help="pretraining view size in pixels (0: the config's 200)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder holding neu-det/")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        for m in args.methods:
            pretrain_stage(m, args.epochs, args.data, args.threads, args.crop)
        for m in args.methods:
            detector_stage(m, args.iters, args.seeds, args.jobs, args.data)
    report(args.iters)


if __name__ == "__main__":
    main()
