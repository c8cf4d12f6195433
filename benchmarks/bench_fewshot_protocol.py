"""The few-shot protocol as a benchmark: runs (or resumes) tools/run_fewshot.py on a protocol file, then records
its wall time, the adaptation cost of each method and the ratio prototype swap / fine-tuning, measured in that run.

    python benchmarks/bench_fewshot_protocol.py [--config configs/protocols/synth_cpu.yaml] [run_fewshot args ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import REPO, save

sys.path.insert(0, str(REPO / "tools"))


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
    args, rest = ap.parse_known_args()
    rest = rest or ["--settings", "base_novel", "cross", "--methods", "prototype", "finetune"]  # = make fewshot-demo
    start = time.time()
    subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--out", str(REPO / "datasets")],
                   check=True)
    cmd = [sys.executable, str(REPO / "tools" / "run_fewshot.py"), "--config", args.config, *rest]
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.time() - start
    import yaml
    out_dir = REPO / yaml.safe_load((REPO / args.config).read_text()).get("OUTPUT_DIR", "output/fewshot")
    results = json.loads((out_dir / "results.json").read_text())
    rows = results["rows"]
    main_rows = [{"setting": r["setting"], "method": r["method"], "K": r["shots"], "n": r["n"],
                  **{m: (r[m]["mean"], r[m]["ci95"]) for m in ("AP", "AP50", "nAP", "F1") if r.get(m)}} for r in rows]
    save("fewshot_protocol", {"command": " ".join(cmd[1:]), "wall_s_this_run": round(wall),
                              "note": "wall time of this invocation: finished cells and models are reused",
                              "adaptation": adaptation_summary(rows), "rows": main_rows})


if __name__ == "__main__":
    main()
