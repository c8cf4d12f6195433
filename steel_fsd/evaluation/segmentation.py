"""Few-shot segmentation metrics: per-class foreground IoU, mIoU and FB-IoU, accumulated over query images.

As in the few-shot segmentation literature (PANet, HSNet): a class's IoU is its intersection summed over all
its query images divided by its union summed over them (not a mean of per-image IoUs); mIoU is the mean of the
classes' IoUs; FB-IoU is the mean of the foreground and background IoU over all queries, pooled.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SegmentationScores"]


class SegmentationScores:
    """Add (prediction, truth) boolean masks of a class's query images; read the IoUs (percent)."""

    def __init__(self) -> None:
        self._fg: dict[str, np.ndarray] = {}  # class -> [intersection, union]
        self._bg = np.zeros(2, dtype=np.int64)

    def add(self, cls: str, pred: np.ndarray, truth: np.ndarray) -> None:
        pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
        fg = self._fg.setdefault(cls, np.zeros(2, dtype=np.int64))
        fg += [np.count_nonzero(pred & truth), np.count_nonzero(pred | truth)]
        self._bg += [np.count_nonzero(~pred & ~truth), np.count_nonzero(~pred | ~truth)]

    def state(self) -> dict:
        """The counts as JSON-ready lists (:meth:`from_state` restores them; :meth:`merge` adds them)."""
        return {"fg": {c: [int(v) for v in iu] for c, iu in self._fg.items()}, "bg": [int(v) for v in self._bg]}

    @classmethod
    def from_state(cls, state: dict) -> "SegmentationScores":
        out = cls()
        out.merge(state)
        return out

    def merge(self, state: dict) -> None:
        for c, iu in state["fg"].items():
            self._fg[c] = self._fg.get(c, np.zeros(2, dtype=np.int64)) + np.asarray(iu, dtype=np.int64)
        self._bg += np.asarray(state["bg"], dtype=np.int64)

    def class_iou(self) -> dict[str, float]:
        return {c: 100.0 * float(i) / float(u) if u else float("nan") for c, (i, u) in self._fg.items()}

    def summary(self) -> dict:
        """``{"per_class": {class: IoU}, "mIoU": ..., "FB-IoU": ...}``; the foreground part of FB-IoU pools the
        intersections and unions of every class."""
        per_class = self.class_iou()
        inter, union = (sum(v[j] for v in self._fg.values()) for j in (0, 1))
        fg = 100.0 * inter / union if union else float("nan")
        bg = 100.0 * self._bg[0] / self._bg[1] if self._bg[1] else float("nan")
        def mean(values):
            kept = [v for v in values if not np.isnan(v)]
            return float(np.mean(kept)) if kept else float("nan")

        return {"per_class": per_class, "mIoU": mean(per_class.values()), "FB-IoU": mean([fg, bg])}
