"""Why a class is not detected: for every ground-truth box, was it proposed (RPN recall at top-k proposals),
and what did the detector make of it (right class, background, a base class, another novel class)?

:func:`gt_outcomes` judges one image from plain tensors; :func:`failure_table` sums the outcomes per class.
``steel_fsd.inference.diagnose`` runs a model over a dataset to produce the inputs.
"""
from __future__ import annotations

from collections import Counter

import torch
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["OUTCOMES", "gt_outcomes", "failure_table"]

OUTCOMES = ("correct", "background", "base_class", "other_novel", "other_class")


def gt_outcomes(gt_boxes: torch.Tensor, gt_classes: torch.Tensor, proposals: torch.Tensor,
                det_boxes: torch.Tensor, det_classes: torch.Tensor, det_scores: torch.Tensor,
                novel: set[int], iou: float = 0.5, ks: tuple[int, ...] = (100, 300),
                score_thresh: float = 0.05) -> list[dict]:
    """One record per ground-truth box of an image.

    ``proposals`` are sorted by objectness (as the RPN returns them): ``proposed@k`` is whether one of the
    first k overlaps the box at IoU >= ``iou``. Among detections scoring >= ``score_thresh`` that overlap it
    at IoU >= ``iou``, the highest-scoring one decides ``outcome``: its class is the box's (``correct``), a
    base class (``base_class``; ``confused_with`` names it), another novel class (``other_novel``), or, with
    no such detection, ``background``. (``other_class`` is for base boxes taken for another base class.)
    """
    records = []
    if len(gt_boxes) == 0:
        return records
    gt = Boxes(gt_boxes.float())
    prop_iou = pairwise_iou(gt, Boxes(proposals.float())) if len(proposals) else torch.zeros(len(gt_boxes), 0)
    keep = det_scores >= score_thresh
    det_boxes, det_classes, det_scores = det_boxes[keep], det_classes[keep], det_scores[keep]
    det_iou = pairwise_iou(gt, Boxes(det_boxes.float())) if len(det_boxes) else torch.zeros(len(gt_boxes), 0)
    for i, c in enumerate(gt_classes.tolist()):
        rec = {"class": c, **{f"proposed@{k}": bool((prop_iou[i, :k] >= iou).any()) for k in ks}}
        hits = (det_iou[i] >= iou).nonzero().flatten() if det_iou.shape[1] else torch.zeros(0, dtype=torch.long)
        if len(hits) == 0:
            rec.update(outcome="background", confused_with=None, score=None)
        else:
            best = hits[det_scores[hits].argmax()]
            p = int(det_classes[best])
            if p == c:
                outcome = "correct"
            elif p in novel:
                outcome = "other_novel"
            elif c in novel:
                outcome = "base_class"
            else:
                outcome = "other_class"
            rec.update(outcome=outcome, confused_with=None if p == c else p, score=float(det_scores[best]))
        records.append(rec)
    return records


def failure_table(records: list[dict], class_names: list[str], novel: set[int], ks: tuple[int, ...] = (100, 300)) -> list[dict]:
    """Per class (novel first): ground-truth count, RPN recall at each k and the share of each outcome (percent),
    with the class most often predicted instead."""
    rows = []
    for c in sorted(range(len(class_names)), key=lambda c: (c not in novel, c)):
        rs = [r for r in records if r["class"] == c]
        if not rs:
            continue
        n = len(rs)
        counts = Counter(r["outcome"] for r in rs)
        wrong = Counter(class_names[r["confused_with"]] for r in rs if r["confused_with"] is not None)
        row = {"class": class_names[c], "novel": c in novel, "gt": n}
        row.update({f"RPN recall@{k}": 100.0 * sum(r[f"proposed@{k}"] for r in rs) / n for k in ks})
        row.update({o: 100.0 * counts.get(o, 0) / n for o in OUTCOMES})
        row["most_confused_with"] = wrong.most_common(1)[0][0] if wrong else None
        rows.append(row)
    return rows
