"""Image-level accept/reject: defect recall at a fixed false-alarm rate on defect-free images.

An image is rejected when its top detection scores at least the threshold. Calibrating the threshold on
defect-free ("good") images fixes the false-alarm rate a line sees on good product; the defect recall at that
rate is what inspection is judged by. :class:`ImageLevelEvaluator` reports it beside COCO AP.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..utils.io import save_figure, write_json

__all__ = ["threshold_for_false_alarm", "rates_at", "roc_points", "roc_auc", "summarize", "plot_roc",
           "ImageLevelEvaluator", "REPORTED_RATES"]

logger = logging.getLogger(__name__)
REPORTED_RATES = (0.01, 0.05)


def threshold_for_false_alarm(good_scores, rate: float) -> float:
    """The lowest score threshold at which at most ``floor(rate * n)`` of the ``n`` good images are rejected
    (rejected: top score >= threshold). Lower thresholds catch more defects, so this one maximises recall
    under the false-alarm budget. With no good image the budget cannot be measured: ValueError."""
    good = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]
    if len(good) == 0:
        raise ValueError("no defect-free image to calibrate a false-alarm rate on")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"false-alarm rate must be in [0, 1], got {rate}")
    allowed = int(math.floor(rate * len(good) + 1e-9))
    if allowed >= len(good):
        return 0.0
    # just above the (allowed+1)-th highest good score: it and every lower good score pass
    return float(np.nextafter(good[allowed], np.inf))


def _share_at_or_above(scores, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, the fraction of ``scores`` >= it (NaN without scores); one sort, no pairwise loop."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        return np.full(len(thresholds), math.nan)
    return (len(s) - np.searchsorted(s, thresholds, side="left")) / len(s)


def rates_at(good_scores, defect_scores, threshold: float) -> tuple[float, float]:
    """(false-alarm rate on good images, recall on defect images) when rejecting scores >= ``threshold``."""
    t = np.array([threshold], dtype=np.float64)
    return float(_share_at_or_above(good_scores, t)[0]), float(_share_at_or_above(defect_scores, t)[0])


def roc_points(good_scores, defect_scores) -> dict[str, list[float]]:
    """The ROC curve: for every distinct score as threshold (and ``None``: above all scores), the false-alarm
    rate and the recall, from (0, 0) to (1, 1)."""
    scores = np.unique(np.concatenate([np.asarray(good_scores, float), np.asarray(defect_scores, float), [0.0]]))
    thresholds = np.concatenate([[np.inf], scores[::-1]])
    return {"threshold": [None if np.isinf(t) else float(t) for t in thresholds],
            "false_alarm": _share_at_or_above(good_scores, thresholds).tolist(),
            "recall": _share_at_or_above(defect_scores, thresholds).tolist()}


def roc_auc(roc: dict[str, list[float]]) -> float:
    """Area under the ROC curve (trapezoids)."""
    return float(np.trapezoid(roc["recall"], roc["false_alarm"])) if hasattr(np, "trapezoid") else \
        float(np.trapz(roc["recall"], roc["false_alarm"]))


def summarize(good_scores, defect_scores, rates=REPORTED_RATES) -> dict[str, float]:
    """Recall (percent) and threshold at each false-alarm rate, image counts and ROC AUC; NaN where there are
    no good (or no defect) images to measure them on."""
    out: dict[str, float] = {"good_images": float(len(good_scores)), "defect_images": float(len(defect_scores))}
    for rate in rates:
        tag = f"{100 * rate:g}%"
        if len(good_scores) and len(defect_scores):
            t = threshold_for_false_alarm(good_scores, rate)
            fa, rec = rates_at(good_scores, defect_scores, t)
            out.update({f"recall@FA{tag}": 100 * rec, f"threshold@FA{tag}": t, f"false_alarm@FA{tag}": 100 * fa})
        else:
            out.update({f"recall@FA{tag}": math.nan, f"threshold@FA{tag}": math.nan, f"false_alarm@FA{tag}": math.nan})
    both = len(good_scores) and len(defect_scores)
    out["roc_auc"] = roc_auc(roc_points(good_scores, defect_scores)) if both else math.nan
    return out


def plot_roc(roc: dict[str, list[float]], path: str, chosen: tuple[float, float] | None = None,
             title: str = "") -> str:
    """The ROC curve (defect recall against false-alarm rate on good images) as a PNG, the chosen operating
    point marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([100 * f for f in roc["false_alarm"]], [100 * r for r in roc["recall"]], drawstyle="steps-post",
            label=f"ROC (AUC {roc_auc(roc):.3f})")
    if chosen is not None:
        ax.plot([100 * chosen[0]], [100 * chosen[1]], "o", color="red",
                label=f"threshold: {100 * chosen[0]:.1f}% false alarms, {100 * chosen[1]:.1f}% recall")
    ax.set_xlabel("false alarms on good images (%)")
    ax.set_ylabel("defect recall (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


class ImageLevelEvaluator(DatasetEvaluator):
    """Top detection score per image against whether the image has ground truth boxes: defect recall at
    1% and 5% false alarms on the defect-free images (``evaluate()`` -> ``{"image_level": {...}}``, floats;
    NaN when the dataset has no defect-free image, e.g. NEU-DET). Tiles count as images."""

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: str | None = None):
        self._dataset_name, self._distributed, self._output_dir = dataset_name, distributed, output_dir
        self._has_defect: dict | None = None
        self.reset()

    def reset(self) -> None:
        self._scores: list[tuple[bool, float]] = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        if self._has_defect is None:
            self._has_defect = {d["image_id"]: bool(d.get("annotations")) for d in DatasetCatalog.get(self._dataset_name)}
        for inp, out in zip(inputs, outputs):
            scores = out["instances"].scores
            self._scores.append((self._has_defect[inp["image_id"]], float(scores.max()) if len(scores) else 0.0))

    def evaluate(self) -> dict[str, dict[str, float]]:
        pairs = self._scores
        if self._distributed:
            comm.synchronize()
            pairs = [p for part in comm.gather(pairs, dst=0) for p in part]
            if not comm.is_main_process():
                return {}
        good = [s for defect, s in pairs if not defect]
        bad = [s for defect, s in pairs if defect]
        results = summarize(good, bad)
        if not good:
            logger.info("[ImageLevelEvaluator] %s has no defect-free image: image-level recall at a false-alarm "
                        "rate is not measured", self._dataset_name)
        else:
            logger.info("[ImageLevelEvaluator] %s: %d good / %d defect images, defect recall %.1f%% at 1%% and "
                        "%.1f%% at 5%% false alarms", self._dataset_name, len(good), len(bad),
                        results["recall@FA1%"], results["recall@FA5%"])
        if self._output_dir:
            write_json(os.path.join(self._output_dir, "image_level.json"),
                       {**results, "roc": roc_points(good, bad) if good and bad else None}, indent=2, sort_keys=False)
        return {"image_level": results}
