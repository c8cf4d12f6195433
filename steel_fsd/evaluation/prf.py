"""Precision / recall / F1 at a fixed score threshold, beside COCO AP.

Detections scoring ``>= score_thresh`` are matched greedily to ground truth at ``IoU >= iou_thresh``
(VOC/COCO style) and counted per class as TP / FP / FN. Ground truth with ``iscrowd=1`` is ignored:
it is not counted, and a detection matching one (and no free regular box) is neither TP nor FP.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from tabulate import tabulate

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils import comm

from ..utils.io import write_json

__all__ = ["match_detections", "prf_from_counts", "PRFEvaluator", "build_prf_evaluator"]

logger = logging.getLogger(__name__)

BoxesLike = Union[Boxes, torch.Tensor, np.ndarray, Sequence[Sequence[float]]]


def _to_boxes(boxes: BoxesLike) -> Boxes:
    if isinstance(boxes, Boxes):
        return Boxes(boxes.tensor.detach().cpu())
    return Boxes(torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4))


def _to_int_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


def match_detections(
    gt_boxes: BoxesLike,
    gt_classes: Any,
    det_boxes: BoxesLike,
    det_scores: Any,
    det_classes: Any,
    iou_thresh: float,
    num_classes: int | None = None,
    gt_iscrowd: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedily match one image's detections to its ground truth, per class.

    Boxes are XYXY_ABS. Detections are visited by descending score (ties: by index, stable); each
    takes the still unmatched, non-crowd ground truth of its class with the highest IoU, provided
    ``IoU >= iou_thresh`` (ties: lowest index), and is then a TP, else an FP. A detection with no such
    match but ``IoU >= iou_thresh`` with a crowd box of its class is ignored (COCO uses IoA there; we
    use IoU); crowd boxes may absorb any number of detections and never count as ground truth.
    No score threshold is applied here.

    Returns ``(tp, fp, n_gt)``, int64 arrays of length ``num_classes`` (default: largest class + 1).
    """
    gt = _to_boxes(gt_boxes)
    det = _to_boxes(det_boxes)
    gt_cls = _to_int_array(gt_classes)
    det_cls = _to_int_array(det_classes)
    scores = np.asarray(
        det_scores.detach().cpu().numpy() if isinstance(det_scores, torch.Tensor) else det_scores,
        dtype=np.float64,
    ).reshape(-1)
    crowd = (np.zeros(len(gt_cls), dtype=bool) if gt_iscrowd is None
             else _to_int_array(gt_iscrowd).astype(bool))
    if not (len(gt) == len(gt_cls) == len(crowd)) or not (len(det) == len(det_cls) == len(scores)):
        raise ValueError("match_detections: boxes, classes, scores and iscrowd lengths differ")
    if num_classes is None:
        num_classes = int(max(gt_cls.max(initial=-1), det_cls.max(initial=-1))) + 1
    if min(gt_cls.min(initial=0), det_cls.min(initial=0)) < 0 or \
            max(gt_cls.max(initial=-1), det_cls.max(initial=-1)) >= num_classes:
        raise ValueError(f"match_detections: class id outside [0, {num_classes})")

    n_gt = np.bincount(gt_cls[~crowd], minlength=num_classes).astype(np.int64)
    tp = np.zeros(num_classes, dtype=np.int64)
    fp = np.zeros(num_classes, dtype=np.int64)
    if len(det) == 0:
        return tp, fp, n_gt
    iou = pairwise_iou(det, gt).numpy() if len(gt) else np.zeros((len(det), 0), np.float32)
    matched = np.zeros(len(gt_cls), dtype=bool)
    for d in np.argsort(-scores, kind="stable"):
        c = det_cls[d]
        same = gt_cls == c
        free = same & ~crowd & ~matched & (iou[d] >= iou_thresh)
        if free.any():
            g = int(np.argmax(np.where(free, iou[d], -1.0)))
            matched[g] = True
            tp[c] += 1
        elif not (same & crowd & (iou[d] >= iou_thresh)).any():
            fp[c] += 1
    return tp, fp, n_gt


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den > 0 else empty


def prf_from_counts(tp: int, fp: int, n_gt: int) -> tuple[float, float, float]:
    """Precision, recall, F1 as fractions (0-1) from counts.

    P = TP/(TP+FP), 0 without detections; R = TP/n_gt, NaN without ground truth;
    F1 = 2TP/(2TP+FP+FN) (the harmonic mean of P and R, 0 when both are 0); all NaN when the class
    has neither ground truth nor detections. A class with detections but no ground truth thus has
    P = 0, R = NaN, F1 = 0.
    """
    fn = n_gt - tp
    if n_gt == 0 and tp + fp == 0:
        return math.nan, math.nan, math.nan
    return (_ratio(tp, tp + fp, 0.0), _ratio(tp, n_gt, math.nan),
            _ratio(2 * tp, 2 * tp + fp + fn, 0.0))


SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95


def sweep_key(threshold: float) -> str:
    """The results key of the macro F1 at a score threshold of :data:`SWEEP_THRESHOLDS` (``f1@0.30``)."""
    return f"f1@{threshold:.2f}"


def f1_at_chosen_threshold(choose_on: dict, apply_to: dict) -> tuple[float, float]:
    """``(threshold, F1)``: the score threshold with the best macro F1 in ``choose_on`` (a validation split's
    ``prf`` results; ties: the lowest threshold) and the macro F1 of ``apply_to`` (the test split's) at it."""
    thresholds = [t for t in SWEEP_THRESHOLDS if sweep_key(t) in choose_on and sweep_key(t) in apply_to]
    if not thresholds:
        raise KeyError("prf results without an F1 sweep (f1@0.05 ... f1@0.95): evaluated before the sweep existed?")
    values = [choose_on[sweep_key(t)] for t in thresholds]
    best = thresholds[int(np.nanargmax(values))] if not all(map(math.isnan, values)) else thresholds[0]
    return best, float(apply_to[sweep_key(best)])


class PRFEvaluator(DatasetEvaluator):
    """Precision, recall and F1 (percent) per class, macro-averaged and micro-averaged.

    ``evaluate()`` returns ``{"prf": {...}}`` with ``precision``/``recall``/``f1`` (macro: means of the
    per-class values over classes with ground truth), ``precision_micro``/``recall_micro``/
    ``f1_micro`` (from total counts), ``TP``/``FP``/``FN`` totals and ``P-<class>``/``R-<class>``/
    ``F1-<class>`` (see :func:`prf_from_counts` for the NaN conventions), and the macro F1 at each score
    threshold of :data:`SWEEP_THRESHOLDS` (``f1@0.05`` ... ``f1@0.95``) with the best of them (``f1_best`` at
    ``thresh_best``): a threshold chosen on a validation split is applied to a test split with
    :func:`f1_at_chosen_threshold`. Ground truth is read from
    ``DatasetCatalog`` by ``image_id``, in the same coordinates as the model outputs (original image, or
    tile for tiled dicts).
    """

    def __init__(self, dataset_name: str, score_thresh: float = 0.5, iou_thresh: float = 0.5,
                 distributed: bool = True, output_dir: str | None = None) -> None:
        self._dataset_name = dataset_name
        self._score_thresh = float(score_thresh)
        self._iou_thresh = float(iou_thresh)
        self._distributed = distributed
        self._output_dir = output_dir
        self._gt: dict[Any, dict] | None = None
        classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
        self._class_names: list[str] | None = list(classes) if classes is not None else None
        self.reset()

    def reset(self) -> None:
        self._counts: dict[str, np.ndarray] = {}
        self._sweep: dict[float, dict[str, np.ndarray]] = {t: {} for t in SWEEP_THRESHOLDS}
        self._num_images = 0

    def _ground_truth(self) -> dict[Any, dict]:
        if self._gt is None:
            gt: dict[Any, dict] = {}
            for record in DatasetCatalog.get(self._dataset_name):
                if record["image_id"] in gt:
                    raise ValueError(f"{self._dataset_name}: duplicate image_id {record['image_id']!r}")
                gt[record["image_id"]] = record
            self._gt = gt
            if self._class_names is None:
                n = 1 + max((a["category_id"] for r in gt.values() for a in r.get("annotations", [])),
                            default=-1)
                self._class_names = [str(i) for i in range(n)]
        return self._gt

    @staticmethod
    def _accumulate(counts: dict, tp: np.ndarray, fp: np.ndarray, n_gt: np.ndarray) -> None:
        for key, value in (("tp", tp), ("fp", fp), ("n_gt", n_gt)):
            counts[key] = counts.get(key, 0) + value

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        gt_by_id = self._ground_truth()
        num_classes = len(self._class_names)
        for inp, out in zip(inputs, outputs):
            record = gt_by_id.get(inp["image_id"])
            if record is None:
                raise KeyError(f"image_id {inp['image_id']!r} is not in dataset {self._dataset_name}")
            anns = record.get("annotations", [])
            gt_boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
            inst = out["instances"].to("cpu")
            for counts, thresh in [(self._counts, self._score_thresh), *((self._sweep[t], t) for t in self._sweep)]:
                keep = inst.scores >= thresh
                self._accumulate(counts, *match_detections(
                    gt_boxes, [a["category_id"] for a in anns],
                    inst.pred_boxes.tensor[keep], inst.scores[keep], inst.pred_classes[keep],
                    self._iou_thresh, num_classes=num_classes,
                    gt_iscrowd=[a.get("iscrowd", 0) for a in anns]))
            self._num_images += 1

    def evaluate(self) -> dict[str, dict[str, float]]:
        states = [(self._counts, self._num_images, self._sweep)]
        if self._distributed:
            comm.synchronize()
            states = comm.gather(states[0], dst=0)
            if not comm.is_main_process():
                return {}
        states = [s for s in states if s[1] > 0]
        if not states:
            logger.warning("[PRFEvaluator] Did not receive valid predictions.")
            return {}
        tp, fp, n_gt = (sum(s[0][k] for s in states) for k in ("tp", "fp", "n_gt"))
        results = self._summarize(tp, fp, n_gt)
        for t in SWEEP_THRESHOLDS:
            counts = [(s[2][t]["tp"], s[2][t]["fp"], s[2][t]["n_gt"]) for s in states]
            results[sweep_key(t)] = self._macro_f1(*(sum(c[i] for c in counts) for i in range(3)))
        sweep = [results[sweep_key(t)] for t in SWEEP_THRESHOLDS]
        if not all(map(math.isnan, sweep)):
            best = int(np.nanargmax(sweep))
            results.update(f1_best=sweep[best], thresh_best=SWEEP_THRESHOLDS[best])
        if self._output_dir:
            write_json(os.path.join(self._output_dir, "prf_results.json"), results, indent=2, sort_keys=False)
        return {"prf": results}

    @staticmethod
    def _per_class_and_macro(tp: np.ndarray, fp: np.ndarray, n_gt: np.ndarray) -> tuple[list, list[float]]:
        """Per-class (P, R, F1) in percent and their means over the classes with ground truth."""
        per_class = [tuple(100.0 * v for v in prf_from_counts(int(t), int(f), int(g)))
                     for t, f, g in zip(tp, fp, n_gt)]
        with_gt = [pc for pc, g in zip(per_class, n_gt) if g > 0]
        return per_class, [float(np.mean(col)) for col in zip(*with_gt)] if with_gt else [math.nan] * 3

    def _macro_f1(self, tp: np.ndarray, fp: np.ndarray, n_gt: np.ndarray) -> float:
        return self._per_class_and_macro(tp, fp, n_gt)[1][2]

    def _summarize(self, tp: np.ndarray, fp: np.ndarray, n_gt: np.ndarray) -> dict[str, float]:
        names = self._class_names or [str(i) for i in range(len(tp))]
        per_class, macro = self._per_class_and_macro(tp, fp, n_gt)
        micro = [100.0 * v for v in prf_from_counts(int(tp.sum()), int(fp.sum()), int(n_gt.sum()))]
        results: dict[str, float] = {
            "precision": macro[0], "recall": macro[1], "f1": macro[2],
            "precision_micro": micro[0], "recall_micro": micro[1], "f1_micro": micro[2],
            "TP": int(tp.sum()), "FP": int(fp.sum()), "FN": int((n_gt - tp).sum()),
        }
        for name, (p, r, f1) in zip(names, per_class):
            results.update({f"P-{name}": p, f"R-{name}": r, f"F1-{name}": f1})
        table = tabulate(
            [[name, int(g), int(t), int(f), int(g - t), *pc]
             for name, t, f, g, pc in zip(names, tp, fp, n_gt, per_class)],
            headers=["category", "#gt", "TP", "FP", "FN", "P", "R", "F1"],
            tablefmt="pipe", floatfmt=".2f", numalign="left")
        logger.info(
            f"PRF on {self._dataset_name} (score >= {self._score_thresh}, IoU >= {self._iou_thresh}):\n"
            f"{table}\nmacro P/R/F1 = {macro[0]:.2f}/{macro[1]:.2f}/{macro[2]:.2f}, "
            f"micro P/R/F1 = {micro[0]:.2f}/{micro[1]:.2f}/{micro[2]:.2f}")
        return results


def build_prf_evaluator(cfg: Any, dataset_name: str, output_dir: str | None = None,
                        distributed: bool = True) -> PRFEvaluator:
    """A :class:`PRFEvaluator` with thresholds from ``cfg.TEST.PRF_SCORE_THRESH`` / ``PRF_IOU_THRESH``."""
    return PRFEvaluator(dataset_name, score_thresh=cfg.TEST.PRF_SCORE_THRESH,
                        iou_thresh=cfg.TEST.PRF_IOU_THRESH, distributed=distributed,
                        output_dir=output_dir)
