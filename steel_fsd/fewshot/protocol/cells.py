"""Protocol cells: one (setting, method, K, seed) result, built by :class:`Cell` and written by
:meth:`Cell.write` (the one writer; the runner and external adapters such as the YOLO benchmark use it)."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from ...evaluation.report import METRICS, per_class_rows
from ...utils.io import write_json


# cell field, ImageLevelEvaluator key, factor to percent
IMAGE_LEVEL_FIELDS = (("img_R@FA1", "recall@FA1%", 1.0), ("img_R@FA5", "recall@FA5%", 1.0), ("img_AUC", "roc_auc", 100.0))


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def cell_record(results: dict, classes: list[str], base: list[str], novel: list[str]) -> dict:
    """The metric part of a cell: mean row, per-class rows, bAP/nAP (NaN-ignoring means), all in percent.

    A model that predicts no box at all gets AP 0 (Detectron2 reports NaN for "no predictions"), flagged
    ``no_predictions``. Where the test split has defect-free images, the image-level accept/reject numbers
    (:class:`~steel_fsd.evaluation.image_level.ImageLevelEvaluator`) come too: defect recall at 1% and 5% false
    alarms (``img_R@FA1``, ``img_R@FA5``) and ROC AUC (``img_AUC``, in percent); None where not measurable.
    """
    rows = per_class_rows(results, classes)
    bbox = results.get("bbox", {})
    empty = bool(bbox) and all(isinstance(v, float) and math.isnan(v) for v in bbox.values())
    if empty:
        for r in rows:
            r.update(AP=0.0, AP50=0.0, AP75=0.0)
    per_class = {r["class"]: {m: r[m] for m in METRICS} for r in rows[:-1]}
    rec = {"metrics": {m: rows[-1][m] for m in METRICS}, "per_class": per_class, "no_predictions": empty}
    for tag, group in (("b", base), ("n", novel)):
        for m in ("AP", "AP50"):
            rec[f"{tag}{m}"] = _mean([per_class[c][m] for c in group]) if base else None
    il = results.get("image_level") or {}
    for field, key, scale in IMAGE_LEVEL_FIELDS:
        v = il.get(key)
        rec[field] = None if v is None or math.isnan(v) else scale * float(v)
    return rec


def _links(cell_path: Path, test: str, train_metrics: str | None, base_metrics: str | None) -> dict:
    """A cell's links (relative to its folder, None when absent): PR curves, fine-tune and base metrics.json."""
    def rel(p: str | None) -> str | None:
        return os.path.relpath(p, cell_path.parent) if p and os.path.isfile(p) else None
    pr = cell_path.with_suffix("") / "inference" / test / "pr_curves.json"
    return {"pr_curves": rel(str(pr)), "train_metrics": rel(train_metrics), "base_metrics": rel(base_metrics)}


@dataclasses.dataclass
class Cell:
    """One cell. ``metrics``/``per_class``/``bAP``... come from :func:`cell_record`; links (PR curves, training
    logs, manifest) are stored relative to the cell file; ``extra`` holds a method's own fields (e.g. YOLO's
    epochs), written beside the others."""

    setting: str
    kind: str
    source: str
    target: str
    method: str
    shots: int
    seed: int
    classes: list
    base_classes: list
    novel_classes: list
    adapt_s: float
    adapt_iters: int
    record: dict
    links: dict
    manifest: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_results(cls, path: Path, results: dict, test: str, *, setting: str, kind: str, source: str,
                     target: str, method: str, shots: int, seed: int, classes: list[str], base: list[str],
                     novel: list[str], adapt_s: float, adapt_iters: int, train_metrics: str | None = None,
                     base_metrics: str | None = None, manifest: str | os.PathLike | None = None,
                     extra: dict | None = None) -> "Cell":
        """The cell of evaluator ``results`` on ``test``, to be written at ``path``."""
        path = Path(path)
        return cls(setting, kind, source, target, method, int(shots), int(seed), list(classes), list(base),
                   list(novel), round(float(adapt_s), 2), adapt_iters,
                   cell_record(results, list(classes), list(base), list(novel) if base else []),
                   _links(path, test, train_metrics, base_metrics),
                   os.path.relpath(manifest, path.parent) if manifest else None, dict(extra or {}))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("record", "links", "extra", "manifest")}
        d.update(self.record, **self.links, **self.extra)
        if self.manifest is not None:
            d["manifest"] = self.manifest
        return d

    def write(self, path: str | os.PathLike) -> dict:
        """Write the cell (strict JSON, atomically) and return it as a dict."""
        d = self.to_dict()
        write_json(path, d)
        return d
