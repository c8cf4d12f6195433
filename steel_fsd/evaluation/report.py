"""Per-class metric tables from the evaluators' results."""
from __future__ import annotations

import math

from tabulate import tabulate

METRICS = ("AP", "AP50", "AP75", "P", "R", "F1")


def per_class_rows(results: dict, class_names: list[str]) -> list[dict]:
    """One row per class plus a ``mean`` row, merging COCO AP/AP50/AP75 and P/R/F1 (all in percent).

    ``results`` is one dataset's evaluator output: ``{"bbox": {...}, "prf": {...}}``.
    """
    bbox, prf = results.get("bbox", {}), results.get("prf", {})
    rows = []
    for c in class_names:
        rows.append({"class": c, "AP": bbox.get(f"AP-{c}", math.nan), "AP50": bbox.get(f"AP50-{c}", math.nan),
                     "AP75": bbox.get(f"AP75-{c}", math.nan), "P": prf.get(f"P-{c}", math.nan),
                     "R": prf.get(f"R-{c}", math.nan), "F1": prf.get(f"F1-{c}", math.nan)})
    rows.append({"class": "mean", "AP": bbox.get("AP", math.nan), "AP50": bbox.get("AP50", math.nan),
                 "AP75": bbox.get("AP75", math.nan), "P": prf.get("precision", math.nan),
                 "R": prf.get("recall", math.nan), "F1": prf.get("f1", math.nan)})
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`per_class_rows` output (tabulate, one decimal)."""
    return tabulate([[r["class"]] + [r[m] for m in METRICS] for r in rows], headers=["class", *METRICS],
                    floatfmt=".1f", tablefmt="simple")


def image_level_line(results: dict) -> str | None:
    """One line on image-level accept/reject (:class:`~steel_fsd.evaluation.image_level.ImageLevelEvaluator`),
    or None when the dataset has no defect-free or no defect image to measure it on."""
    il = results.get("image_level") or {}
    if not il.get("good_images") or not il.get("defect_images"):
        return None
    return (f"image level ({int(il['good_images'])} defect-free / {int(il['defect_images'])} defect images): "
            f"defect recall {il['recall@FA1%']:.1f}% at 1% false alarms, {il['recall@FA5%']:.1f}% at 5%, "
            f"ROC AUC {il['roc_auc']:.3f}")
