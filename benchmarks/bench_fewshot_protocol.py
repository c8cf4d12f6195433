"""The few-shot protocol as a benchmark: runs (or resumes) a protocol file in this process
(:meth:`steel_fsd.fewshot.protocol.Protocol.run`, as tools/run_fewshot.py does), then records its wall time,
the adaptation cost of each method and the ratio prototype swap / fine-tuning, measured in that run.

    python benchmarks/bench_fewshot_protocol.py [--config configs/protocols/synth_cpu.yaml] \
        [--settings base_novel cross] [--methods prototype finetune]
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common import REPO, save, synthetic_datasets


def adaptation_summary(rows: list[dict]) -> dict:
    """Mean adaptation seconds per (setting, K, method) and the prototype/fine-tune ratios."""
    by = {(r["setting"], r["shots"], r["method"]): r["adapt_s"]["mean"] for r in rows
          if r.get("adapt_s") and r["adapt_s"].get("mean") is not None and r["kind"] in ("base_novel", "cross", "kshot")}
    out = []
    for (setting, k, method), sec in sorted(by.items()):
        ft = by.get((setting, k, "finetune"))
        out.append({"setting": setting, "shots": k, "method": method, "adapt_s": round(sec, 2),
                    "ratio_to_finetune": round(sec / ft, 3) if ft else None})
    return {"cells": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/protocols/synth_cpu.yaml")
    ap.add_argument("--settings", nargs="+", default=["base_novel", "cross"], help="setting kinds (= make fewshot-demo)")
    ap.add_argument("--methods", nargs="+", default=["prototype", "finetune"])
    args = ap.parse_args()
    from steel_fsd.fewshot.protocol import Protocol

    os.chdir(REPO)  # the protocol file's paths (model configs, OUTPUT_DIR) are relative to the repository
    start = time.time()
    synthetic_datasets()
    protocol = Protocol(args.config, methods=args.methods)
    protocol.run(protocol.select(args.settings), variants=False)
    wall = time.time() - start
    rows = json.loads((protocol.out / "results.json").read_text())["rows"]
    main_rows = [{"setting": r["setting"], "method": r["method"], "K": r["shots"], "n": r["n"],
                  **{m: (r[m]["mean"], r[m]["ci95"]) for m in ("AP", "AP50", "nAP", "F1") if r.get(m)}} for r in rows]
    save("fewshot_protocol", {"command": f"python benchmarks/bench_fewshot_protocol.py --config {args.config} "
                                         f"--settings {' '.join(args.settings)} --methods {' '.join(args.methods)}",
                              "wall_s_this_run": round(wall),
                              "note": "wall time of this invocation: finished cells and models are reused",
                              "adaptation": adaptation_summary(rows), "rows": main_rows})


if __name__ == "__main__":
    main()
