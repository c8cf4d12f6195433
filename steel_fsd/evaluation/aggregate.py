"""Statistics over few-shot protocol cells: one JSON per (setting, method, K, seed), all metrics in percent.

:func:`load_cells` reads and validates the cell files, :func:`aggregate` gives mean and 95% t-interval
per (setting, method, K) over seeds, :func:`paired` compares two methods seed by seed,
:func:`convergence` finds when a training run's validation metric gets close to its final value, and
:func:`write_results` writes ``results.json`` / ``results.csv``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import stats

from .report import METRICS
from ..utils.io import atomic_open, write_json

logger = logging.getLogger("steel_fsd")

# full_data: a detector trained on a whole target train split (the upper bound of the K-shot rows)
KINDS = ("base_novel", "cross", "kshot", "ablation", "preprocessing", "full_data")
# dbAP50: bAP50 minus the base model's own bAP50 on the same test split (forgetting of the base classes)
SPLIT_METRICS = ("bAP", "nAP", "bAP50", "nAP50", "dbAP50")
# image level, where the test split has defect-free images: defect recall at 1% / 5% false alarms, ROC AUC
IMAGE_METRICS = ("img_R@FA1", "img_R@FA5", "img_AUC")
STATS = METRICS + SPLIT_METRICS + IMAGE_METRICS + ("adapt_s", "adapt_iters")
PER_CLASS_STATS = ("AP", "AP50")
REQUIRED = ("setting", "kind", "method", "shots", "seed", "classes", "metrics", "per_class")
GROUP_FIELDS = ("kind", "source", "target", "classes", "base_classes", "novel_classes")


def load_cells(root: str, pattern: str = "*.json") -> list[dict]:
    """Every cell file matching ``pattern`` under ``root`` (recursive, sorted), each with its ``_path``.

    Raises ``ValueError`` naming the file when it is not a JSON object with the required fields.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no cell folder {root}")
    return [dict(read_cell(path), _path=str(path)) for path in sorted(Path(root).rglob(pattern))]


def read_cell(path: str | os.PathLike) -> dict:
    """One cell file, checked; ``ValueError`` naming the file (and saying how to redo the cell) if it is
    truncated, not JSON or lacks a required field."""
    redo = "delete it to run that cell again"
    try:
        cell = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: truncated or not a JSON cell file ({e}), {redo}") from None
    if not isinstance(cell, dict):
        raise ValueError(f"{path}: a cell file holds a JSON object, {redo}")
    missing = [k for k in REQUIRED if k not in cell]
    if missing:
        raise ValueError(f"{path}: missing required field(s) {missing}, {redo}")
    if cell["kind"] not in KINDS:
        raise ValueError(f"{path}: kind {cell['kind']!r} is not one of {KINDS}, {redo}")
    if not isinstance(cell["metrics"], dict) or not isinstance(cell["per_class"], dict):
        raise ValueError(f"{path}: 'metrics' and 'per_class' must be objects, {redo}")
    return cell


def cell_file(cell: dict, field: str) -> str | None:
    """The file a cell names in ``field`` (relative to the cell's folder), or None when absent or missing."""
    rel = cell.get(field)
    if not rel:
        return None
    path = os.path.join(os.path.dirname(cell.get("_path", "")), rel)
    if not os.path.isfile(path):
        logger.info("%s: %s file %s does not exist", cell.get("_path"), field, path)
        return None
    return path


def _finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_ci(values: Iterable[float | None]) -> dict:
    """Mean, sample SD (ddof=1) and 95% t-interval half-width ``t(0.975, n-1) * sd / sqrt(n)``.

    None and NaN are ignored; ``n`` counts the rest. ``mean`` is None for n=0, ``sd``/``ci95`` for n<2.
    """
    xs = _finite(values)
    n = len(xs)
    out = {"mean": None, "ci95": None, "n": n, "sd": None, "values": xs}
    if n:
        out["mean"] = float(np.mean(xs))
    if n > 1:
        out["sd"] = float(np.std(xs, ddof=1))
        out["ci95"] = float(stats.t.ppf(0.975, n - 1) * out["sd"] / math.sqrt(n))
    return out


def cell_value(cell: dict, name: str) -> float | None:
    """A summary metric of a cell: ``metrics[name]`` for COCO/PRF metrics, the top-level field otherwise."""
    value = cell["metrics"].get(name) if name in METRICS else cell.get(name)
    return None if value is None else float(value)


def method_sort_key(order=()):
    """A sort key for method names: the methods of ``order`` (e.g. a protocol file's METHODS) in that order,
    then any other method (e.g. an external adapter's) alphabetically."""
    order = list(order)
    return lambda method: (order.index(method) if method in order else len(order), method)


def index_cells(cells: list[dict]) -> dict[tuple, dict]:
    """Cells by ``(setting, method, shots, seed)``; a repeated key raises ``ValueError`` naming both files."""
    out: dict[tuple, dict] = {}
    for c in cells:
        key = (c["setting"], c["method"], int(c["shots"]), int(c["seed"]))
        if key in out:
            raise ValueError(f"cells {out[key].get('_path')} and {c.get('_path')} are both {key}")
        out[key] = c
    return out


def _summarize(setting: str, method: str, shots: int, group: list[dict]) -> dict:
    first = group[0]
    for c in group[1:]:
        for f in GROUP_FIELDS:
            if c.get(f) != first.get(f):
                raise ValueError(f"{c.get('_path')}: {f} differs from {first.get('_path')} in the same group")
    row = {"setting": setting, "method": method, "shots": shots, "n": len(group),
           "seeds": sorted(int(c["seed"]) for c in group), **{f: first.get(f) for f in GROUP_FIELDS}}
    for name in STATS:
        values = [cell_value(c, name) for c in group]
        if any(v is not None for v in values):
            row[name] = mean_ci(values)
    row["per_class"] = {cls: {m: mean_ci(c["per_class"].get(cls, {}).get(m) for c in group)
                              for m in PER_CLASS_STATS} for cls in first["classes"]}
    return row


def aggregate(cells: list[dict], method_order=()) -> list[dict]:
    """One row per (setting, method, K): :func:`mean_ci` over seeds of each metric present, per class too.

    Rows are ordered by setting, method (``method_order`` first, see :func:`method_sort_key`), K; tables and
    plots keep this order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for (setting, method, shots, _), c in sorted(index_cells(cells).items()):
        groups[(setting, method, shots)].append(c)
    key = method_sort_key(method_order)
    return sorted((_summarize(*k, group) for k, group in groups.items()),
                  key=lambda r: (r["setting"], *key(r["method"]), r["shots"]))


def paired(cells: list[dict], a: str = "prototype", b: str = "finetune",
           metrics: Iterable[str] = ("AP50", "AP", "nAP50", "nAP")) -> list[dict]:
    """Seed-matched comparison of methods ``a`` and ``b`` per (setting, K, metric) where both have values.

    Each row: per-seed ``diffs`` (a - b), their :func:`mean_ci` as ``diff``, ``wins``/``losses``/``ties``
    of ``a`` and the paired t-test ``p`` (None for n < 2 or zero-variance differences).
    """
    index = index_cells(cells)
    matched: dict[tuple[str, int], list[tuple[int, dict, dict]]] = defaultdict(list)
    for (setting, method, shots, seed), cell_a in sorted(index.items()):
        cell_b = index.get((setting, b, shots, seed))
        if method == a and cell_b is not None:
            matched[setting, shots].append((seed, cell_a, cell_b))
    out = []
    for (setting, shots), trios in sorted(matched.items()):
        for metric in metrics:
            pairs = [(seed, cell_value(ca, metric), cell_value(cb, metric)) for seed, ca, cb in trios]
            pairs = [(seed, va, vb) for seed, va, vb in pairs if len(_finite([va, vb])) == 2]
            if not pairs:
                continue
            diffs = [va - vb for _, va, vb in pairs]
            diff = mean_ci(diffs)
            p = None
            if len(pairs) > 1 and diff["sd"] > 0:
                p = float(stats.ttest_rel([va for _, va, _ in pairs], [vb for _, _, vb in pairs]).pvalue)
            out.append({"setting": setting, "kind": trios[0][1]["kind"], "shots": shots,
                        "metric": metric, "a": a, "b": b, "seeds": [sd for sd, _, _ in pairs], "diffs": diffs,
                        "diff": diff, "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
                        "ties": sum(d == 0 for d in diffs), "p": p})
    return out


def read_metrics(path: str) -> list[dict]:
    """Detectron2's ``metrics.json`` (JSON lines) as one dict per iteration, sorted by iteration.

    Lines of the same iteration (split writes, or repeats after a resume) are merged in file order, so
    the last value of each key wins. Lines without ``iteration`` are skipped.
    """
    merged: dict[int, dict] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
            if isinstance(record, dict) and "iteration" in record:
                merged.setdefault(int(record["iteration"]), {}).update(record)
    return [merged[i] for i in sorted(merged)]


def matching_keys(records: list[dict], key: str) -> list[str]:
    """Keys equal to ``key`` or ending with ``/key`` (dataset-prefixed evaluation results), sorted."""
    return sorted({k for r in records for k in r if k == key or k.endswith("/" + key)})


def metric_series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    """Iterations and finite values of the exact key ``name``."""
    points = [(int(r["iteration"]), float(r[name])) for r in records
              if r.get(name) is not None and not math.isnan(float(r[name]))]
    return [i for i, _ in points], [v for _, v in points]


def convergence(metrics_json: str, key: str = "bbox/AP", fraction: float = 0.95,
                ims_per_batch: int | None = None, num_images: int | None = None) -> dict:
    """First iteration whose ``key`` value reaches ``fraction`` of the final one (the last evaluated).

    ``epochs = (iteration + 1) * ims_per_batch / num_images`` when both are given. All values are None
    when ``key`` never appears; a ``key`` matching several prefixed keys raises ``ValueError``.
    """
    records = read_metrics(metrics_json)
    names = matching_keys(records, key)
    if len(names) > 1:
        raise ValueError(f"{metrics_json}: {key!r} matches {names}; pass the full key")
    out = {"key": None, "fraction": fraction, "iteration": None, "epochs": None, "value": None,
           "final": None, "final_iteration": None, "target": None}
    iters, values = metric_series(records, names[0]) if names else ([], [])
    if not iters:
        return out
    target = fraction * values[-1]
    it, value = next((i, v) for i, v in zip(iters, values) if v >= target)
    out.update(key=names[0], iteration=it, value=value, final=values[-1], final_iteration=iters[-1], target=target)
    if ims_per_batch and num_images:
        out["epochs"] = (it + 1) * ims_per_batch / num_images
    return out


def _cell_record(cell: dict, out_dir: str) -> dict:
    record = {k: v for k, v in cell.items() if not k.startswith("_")}
    if "_path" in cell:
        record["path"] = os.path.relpath(cell["_path"], out_dir)
    return record


def csv_header() -> list[str]:
    """``results.csv`` columns."""
    return ["setting", "kind", "method", "shots", "n"] + [f"{m}_{s}" for m in STATS for s in ("mean", "ci95")]


def write_results(rows: list[dict], paired_rows: list[dict], out_dir: str,
                  cells: Iterable[dict] = ()) -> tuple[str, str]:
    """Write ``results.json`` (rows, paired rows, per-cell records) and ``results.csv`` (one line per row).

    Output is deterministic: sorted keys, NaN as null, cell paths relative to ``out_dir``, no timestamps.
    Returns both paths.
    """
    json_path, csv_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.csv")
    doc = {"rows": rows, "paired": paired_rows, "cells": [_cell_record(c, out_dir) for c in cells]}
    write_json(json_path, doc, indent=2)
    with atomic_open(csv_path) as f:
        writer = csv.writer(f)
        writer.writerow(csv_header())
        for r in rows:
            line = [r["setting"], r["kind"], r["method"], r["shots"], r["n"]]
            for m in STATS:
                stat = r.get(m) or {}
                line += ["" if stat.get(s) is None else repr(stat[s]) for s in ("mean", "ci95")]
            writer.writerow(line)
    return json_path, csv_path
