"""Prototype-head logits and embedding normalization, measured: the paper's head (MODEL.PROTOTYPE.LOGIT distance,
EMBED_NORM "") against the factorized cosine logits and/or BN-centred embeddings, and without the triplet loss;
same config, data and iterations (CPU demo model, synthetic NEU, 200 px, from scratch). Each row is one
``tools/train_net.py`` run (train, then evaluate on neu_synth_test).

    STEEL_FSD_DATASETS=/tmp/data python benchmarks/bench_proto_logits.py --iters 300 --seeds 0 \
        --variants paper factorized+BN_triplet0.1 --out-root output/bench/proto_logits

Per row: fast_rcnn/fg_cls_accuracy and prototype/tau at every logged iteration, final AP/AP50/AP75, P/R/F1 at
TEST.PRF_SCORE_THRESH (inference/<dataset>/prf_results.json), test detections scoring >= that threshold, wall
time. ``--collect`` only reads finished output folders (``wall_s.json`` in each, written by a run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CFG = "configs/demo/proto_R18_FPN_synth_neu.yaml"
DATASET = "neu_synth_test"


_P = "MODEL.PROTOTYPE."
VARIANTS = {  # name -> head overrides (everything else: the demo config); factorized+BN_triplet0.1 = the demo's head
    "paper": [_P + "LOGIT", "distance", _P + "EMBED_NORM", "", _P + "TRIPLET_WEIGHT", "1.0"],
    "factorized": [_P + "LOGIT", "factorized", _P + "EMBED_NORM", "", _P + "TRIPLET_WEIGHT", "1.0"],
    "paper+BN": [_P + "LOGIT", "distance", _P + "EMBED_NORM", "BN", _P + "TRIPLET_WEIGHT", "1.0"],
    "factorized+BN": [_P + "LOGIT", "factorized", _P + "EMBED_NORM", "BN", _P + "TRIPLET_WEIGHT", "1.0"],
    "factorized+BN_triplet0.1": [_P + "LOGIT", "factorized", _P + "EMBED_NORM", "BN", _P + "TRIPLET_WEIGHT", "0.1"],
    "paper+BN_triplet0.1": [_P + "LOGIT", "distance", _P + "EMBED_NORM", "BN", _P + "TRIPLET_WEIGHT", "0.1"],
    "factorized+BN_no_triplet": [_P + "LOGIT", "factorized", _P + "EMBED_NORM", "BN", _P + "TRIPLET_WEIGHT", "0.0"],
    "paper_no_triplet": [_P + "LOGIT", "distance", _P + "EMBED_NORM", "", _P + "TRIPLET_WEIGHT", "0.0"],
    "factorized_no_triplet": [_P + "LOGIT", "factorized", _P + "EMBED_NORM", "", _P + "TRIPLET_WEIGHT", "0.0"],
}


def overrides(variant: str, iters: int, seed: int, out: Path) -> list[str]:
    steps = f"({round(iters * 23 / 30)},{round(iters * 28 / 30)})"  # the demo's (380, 460) of 500, scaled
    return [*VARIANTS[variant], "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", steps, "SEED", str(seed),
            "OUTPUT_DIR", str(out)]


def run(variant: str, iters: int, seed: int, out: Path) -> None:
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", CFG,
           *overrides(variant, iters, seed, out)]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    (out / "wall_s.json").write_text(json.dumps({"wall_s": round(time.perf_counter() - start, 1)}))


def collect(variant: str, iters: int, seed: int, out: Path, score_thresh: float = 0.5) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    curve = [{"iter": r["iteration"] + 1, "fg_cls_accuracy": round(r["fast_rcnn/fg_cls_accuracy"], 3),
              "cls_accuracy": round(r["fast_rcnn/cls_accuracy"], 3), "tau": round(r["prototype/tau"], 2),
              "loss_cls": round(r["loss_cls"], 3), "loss_triplet": round(r["loss_triplet"], 3)}
             for r in rows if "fast_rcnn/fg_cls_accuracy" in r]
    final = next(r for r in reversed(rows) if "bbox/AP50" in r)
    prf = json.loads((out / "inference" / DATASET / "prf_results.json").read_text())
    dets = json.loads((out / "inference" / DATASET / "coco_instances_results.json").read_text())
    scores = [d["score"] for d in dets]
    return {
        "variant": variant, "config": CFG, "overrides": overrides(variant, iters, seed, Path(out.name)),
        "iterations": iters, "seed": seed, "wall_s": json.loads((out / "wall_s.json").read_text())["wall_s"],
        "fg_cls_accuracy_curve": curve,
        "fg_cls_accuracy_last5_mean": round(sum(c["fg_cls_accuracy"] for c in curve[-5:]) / len(curve[-5:]), 3),
        "AP": round(final["bbox/AP"], 2), "AP50": round(final["bbox/AP50"], 2), "AP75": round(final["bbox/AP75"], 2),
        "precision": round(prf["precision"], 1), "recall": round(prf["recall"], 1),  # prf_results.json: percent
        "F1": round(prf["f1"], 1), "F1_micro": round(prf["f1_micro"], 1),
        "TP": prf["TP"], "FP": prf["FP"], "FN": prf["FN"],
        "F1_per_class": {k[3:]: round(v, 1) for k, v in prf.items() if k.startswith("F1-")},
        "out_dir": str(out),
        "test_detections": len(scores),
        f"test_detections_score_ge_{score_thresh}": sum(s >= score_thresh for s in scores),
        "max_test_score": round(max(scores), 3) if scores else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=["paper", "factorized+BN_triplet0.1"], choices=sorted(VARIANTS))
    p.add_argument("--out-root", default="output/bench/proto_logits")
    p.add_argument("--collect", action="store_true", help="only read finished output folders")
    p.add_argument("--note", default="")
    a = p.parse_args()
    rows = []
    for variant in a.variants:
        for seed in a.seeds:
            out = (REPO / a.out_root / f"{variant}_s{seed}").resolve()
            if not a.collect:
                run(variant, a.iters, seed, out)
            rows.append(collect(variant, a.iters, seed, out))
    import platform

    import torch
    result = {"benchmark": "proto_logits_synth", "dataset_train": "neu_synth_train (tools/make_synthetic.py defaults)",
              "dataset_test": DATASET, "score_thresh": 0.5,
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "note": a.note, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "proto_logits_synth.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({f"{r['variant']}_s{r['seed']}": {k: r[k] for k in ("fg_cls_accuracy_last5_mean", "AP50", "F1",
                                                                          "wall_s")} for r in rows}, indent=2))


if __name__ == "__main__":
    main()
