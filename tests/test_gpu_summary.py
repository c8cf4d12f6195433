"""benchmarks/gpu_summary.py: the GPU check's rows from run records and Detectron2 metrics files, including a run
that timed out mid-write and one that failed before logging anything."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_summary  # noqa: E402


def test_rows_status_speed_and_final_results(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    (out / "gpu_runs.txt").write_text("stock\tc1.yaml\t130\tok\nprototype\tc2.yaml\t200\ttimeout\n"
                                      "broken\tc3.yaml\t3\tfailed (exit 1)\n")
    (runs / "stock").mkdir(parents=True)
    lines = [{"iteration": i, "total_loss": 1.0, "time": t} for i, t in enumerate([0.2, 0.1, 0.1, 0.3, 0.1])]
    lines.append({"iteration": 4, "neu_val/bbox/AP50": 61.0, "neu_test/bbox/AP50": 60.0, "neu_test/prf/f1": 0.5})
    (runs / "stock" / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (runs / "prototype").mkdir()
    (runs / "prototype" / "metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": 2.0, "time": 0.2})
                                                     + '\n{"iteration": 1, "total_lo')  # killed mid-line
    summary = gpu_summary.main([str(out), "5", "True"], output_root=runs)
    stock, proto, broken = summary["runs"]
    assert stock["status"] == "ok" and stock["iterations_done"] == 5 and stock["s_per_iteration"] == 0.1
    assert stock["train_images_per_s"] == 80.0
    assert stock["neu_val"] == {"bbox/AP50": 61.0} and stock["neu_test"] == {"bbox/AP50": 60.0, "prf/f1": 0.5}
    assert proto["status"] == "timeout" and proto["iterations_done"] == 1 and proto["neu_test"] is None
    assert broken == {"name": "broken", "config": "c3.yaml", "iterations": 5, "wall_s": 3, "status": "failed (exit 1)",
                      "iterations_done": 0, "neu_val": None, "neu_test": None}
    assert json.loads((out / "gpu_real_neu.json").read_text()) == summary
    assert "not run" in summary["inference"]
