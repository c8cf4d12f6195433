"""The few-shot protocol's report: cells -> results.json/csv, report.md (tables) and plots/*.png."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .aggregate import aggregate, convergence, load_cells, paired, write_results
from .fewshot_plots import write_all_plots
from .fewshot_tables import markdown_report

logger = logging.getLogger("steel_fsd")

CELL_PATTERN = "K*_seed*.json"  # cells/<setting>/<method>/K<k>_seed<s>.json (evaluator files sit in K.._seed../)


def convergence_rows(out_dir: Path, fraction: float = 0.95) -> list[dict]:
    """Iterations and epochs to reach ``fraction`` of the final validation mAP, per trained model
    (``setting`` is the model's folder under ``models/``: its label and config hash)."""
    rows = []
    for info_path in sorted(out_dir.glob("models/*/train_info.json")):
        info = json.loads(info_path.read_text())
        metrics = info_path.parent / "metrics.json"
        if not metrics.is_file():
            continue
        c = convergence(str(metrics), "bbox/AP", fraction, info.get("ims_per_batch"), info.get("num_images"))
        rows.append(dict(c, method=info["model"], setting=info_path.parent.name, train=info["train"],
                         iterations=info.get("iterations"),
                         train_s=info.get("seconds")))
    return rows


def write_report(out_dir: str | Path, method_order=(), pairs=()) -> dict:
    """Aggregate every finished cell under ``out_dir``/cells; write results, report.md and plots.

    Methods appear in ``method_order`` (a protocol file's METHODS; others after, alphabetically); each
    ``(a, b)`` of ``pairs`` (its PAIRED) gets seed-paired comparisons a - b.
    Returns ``{"markdown": str, "plots": [paths], "results": path, "csv": path}``.
    """
    out_dir = Path(out_dir)
    cells = load_cells(str(out_dir / "cells"), CELL_PATTERN) if (out_dir / "cells").is_dir() else []
    rows = aggregate(cells, method_order)
    pairs = [p for a, b in pairs for p in paired(cells, a, b)]
    conv = convergence_rows(out_dir)
    json_path, csv_path = write_results(rows, pairs, str(out_dir), cells)
    markdown = markdown_report(rows, pairs, conv)
    (out_dir / "report.md").write_text(markdown + "\n")
    plots = write_all_plots(rows, cells, str(out_dir / "plots"))
    logger.info("few-shot report: %d cells, %d rows -> %s, %s, %d plots", len(cells), len(rows), json_path,
                out_dir / "report.md", len(plots))
    return {"markdown": markdown, "plots": plots, "results": str(json_path), "csv": str(csv_path)}
