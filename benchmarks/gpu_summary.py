"""Summary of benchmarks/gpu_real_neu.sh: one row per training run (status, wall time, images/s, the final
neu_val / neu_test results from its metrics.json) and the inference rows, in ``<OUT>/gpu_real_neu.json``.

    python benchmarks/gpu_summary.py OUT ITERS AMP
A run that timed out or failed keeps its row, with its status and whatever it logged (no traceback here).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SPLITS = ("neu_val", "neu_test")


def run_row(line: str, iters: int, output_root: Path) -> dict:
    name, config, wall, status = line.split("\t")
    row = {"name": name, "config": config, "iterations": iters, "wall_s": int(wall), "status": status}
    records = []
    metrics = output_root / name / "metrics.json"
    if metrics.is_file():
        for text in metrics.read_text().splitlines():
            try:
                records.append(json.loads(text))
            except json.JSONDecodeError:  # a line torn by a killed run
                continue
    times = [r["time"] for r in records if "time" in r]
    done = max((r["iteration"] for r in records if "total_loss" in r), default=-1) + 1
    row["iterations_done"] = done
    if times:  # Detectron2's per-iteration time (median of its window), batch 8
        row["s_per_iteration"] = round(sorted(times)[len(times) // 2], 4)
        row["train_images_per_s"] = round(8 / row["s_per_iteration"], 1)
    final = {}
    for r in records:  # the evaluation at the end, as Detectron2's EvalHook logs it
        for key, value in r.items():
            split, _, metric = key.partition("/")
            if split in SPLITS and metric:
                final.setdefault(split, {})[metric] = value
    for split in SPLITS:
        row[split] = final.get(split)
    return row


def main(argv: list[str], output_root: Path = Path("output/gpu")) -> dict:
    out, iters, amp = Path(argv[0]), int(argv[1]), argv[2]
    runs_file = out / "gpu_runs.txt"
    lines = [ln for ln in runs_file.read_text().splitlines() if ln.strip()] if runs_file.is_file() else []
    summary = {"benchmark": "gpu_real_neu", "amp": amp, "runs": [run_row(ln, iters, output_root) for ln in lines]}
    inference = out / "gpu_inference.json"
    if inference.is_file():
        try:
            summary["inference"] = json.loads(inference.read_text())
        except json.JSONDecodeError:
            summary["inference"] = "unreadable (see gpu_inference.log)"
    else:
        summary["inference"] = "not run or failed (see gpu_inference.log)"
    (out / "gpu_real_neu.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
