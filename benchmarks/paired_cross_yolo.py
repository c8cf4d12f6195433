"""Seed-paired comparison of the cross-dataset rows against the YOLO11n fine-tune (the peer a user would pick),
at K = 5 and 10: per-seed AP50 differences, their mean and 95% CI, wins / losses and the paired t-test.

    python benchmarks/paired_cross_yolo.py [--cells benchmarks/results/fewshot_cross_real/cells]

Our rows come from the protocol's cell files (`tools/run_fewshot.py --config configs/protocols/cross_real_cpu.yaml`);
the YOLO rows from `benchmarks/bench_yolo.py --cross-source ...` results (`benchmarks/results/yolo_cross_<setting>.json`,
per-seed metrics on the same K-shot manifests and test splits, scored by the same evaluators). Writes
benchmarks/results/fewshot_cross_real/paired_yolo.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS

from steel_fsd.evaluation.aggregate import mean_ci, read_cell
from scipy import stats

ROWS = {"cross_neu-mt": ["prototype", "prototype_pcb", "prototype_ft", "finetune", "tfa"],
        "cross_neu-severstal": ["prototype", "prototype_pcb", "prototype_ft", "finetune"],
        "cross_mt-neu": ["prototype", "prototype_pcb", "prototype_ft", "finetune"],
        "cross_severstal-neu": ["prototype", "prototype_pcb", "prototype_ft", "finetune", "tfa"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=str(RESULTS / "fewshot_cross_real" / "cells"))
    args = ap.parse_args()
    rows = []
    for setting, methods in ROWS.items():
        results = RESULTS / f"yolo_{setting}.json"
        if not results.is_file():
            print(f"{setting}: no YOLO results ({results.name}); skipped")
            continue
        yolo = json.loads(results.read_text())["cross"]["shots"]
        for k in (5, 10):
            per_seed = yolo[str(k)]["per_seed"]
            for m in methods:
                pairs = []
                for seed, metrics in sorted(per_seed.items()):
                    path = Path(args.cells) / setting / m / f"K{k}_seed{seed}.json"
                    if path.is_file():
                        pairs.append((int(seed), read_cell(path)["metrics"]["AP50"], metrics["AP50"]))
                if len(pairs) < 2:
                    continue
                diffs = [a - b for _, a, b in pairs]
                p = float(stats.ttest_rel([a for _, a, _ in pairs], [b for _, _, b in pairs]).pvalue)
                rows.append({"setting": setting, "shots": k, "a": m, "b": "yolo_ft", "seeds": [s for s, _, _ in pairs],
                             "diffs": diffs, "diff": mean_ci(diffs), "wins": sum(d > 0 for d in diffs),
                             "losses": sum(d < 0 for d in diffs), "p": p})
                r = rows[-1]
                print(f"{setting} K={k} {m} - yolo_ft: AP50 {r['diff']['mean']:+.1f} ± {r['diff']['ci95']:.1f} "
                      f"({r['wins']}/{len(diffs)} seeds, p = {p:.3g})")
    out = RESULTS / "fewshot_cross_real" / "paired_yolo.json"
    out.write_text(json.dumps({"benchmark": "paired_cross_yolo", "metric": "AP50", "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
