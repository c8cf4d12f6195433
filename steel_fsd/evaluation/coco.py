"""COCO evaluation with per-class AP50/AP75 beside Detectron2's per-class AP, and PR curves."""
from __future__ import annotations

import json
import os

import numpy as np
from detectron2.evaluation import COCOEvaluator

from ..utils.env import has_compiled_ops
from ..utils.io import write_json

PR_CURVES_FILE = "pr_curves.json"
PR_IOUS = {"precision": 0.5, "precision75": 0.75}  # pr_curves.json field -> IoU threshold


def _iou_index(coco_eval, thr: float) -> int:
    return list(np.round(coco_eval.params.iouThrs, 2)).index(thr)


def pr_curves_from_eval(coco_eval, class_names: list[str]) -> dict:
    """Interpolated precision (0-1) at COCOeval's 101 recall thresholds, per class, all areas, max dets.

    Returns ``{"recall": [...], "iou": 0.5, "precision": {class: [...]}, "iou75": 0.75,
    "precision75": {class: [...]}}``; ``None`` where COCO leaves precision undefined (-1: no ground truth).
    """
    precisions = coco_eval.eval["precision"]  # (iou, recall, class, area, max dets)
    curves: dict = {"recall": [round(float(r), 6) for r in coco_eval.params.recThrs],
                    "iou": PR_IOUS["precision"], "iou75": PR_IOUS["precision75"]}
    for field, thr in PR_IOUS.items():
        t = _iou_index(coco_eval, thr)
        curves[field] = {name: [float(v) if v > -1 else None for v in precisions[t, :, k, 0, -1]]
                         for k, name in enumerate(class_names)}
    return curves


def read_pr_curves(path: str) -> dict:
    """A ``pr_curves.json`` with ``recall`` and each precision curve as float arrays (NaN where undefined)."""
    with open(path) as f:
        curves = json.load(f)
    curves["recall"] = np.asarray(curves["recall"], dtype=float)
    for field in PR_IOUS:
        curves[field] = {c: np.asarray(v, dtype=float) for c, v in curves.get(field, {}).items()}
    return curves


class SteelCOCOEvaluator(COCOEvaluator):
    """Detectron2's :class:`COCOEvaluator` that also reports ``AP50-<class>`` and ``AP75-<class>``.

    With an ``output_dir`` it also writes the per-class PR curves (:func:`pr_curves_from_eval`) to
    ``pr_curves.json`` (``pr_curves_<task>.json`` for tasks other than bbox).
    ``use_fast_impl`` defaults to Detectron2's C++ COCOeval only when the compiled ops exist.
    """

    def __init__(self, dataset_name: str, *args, use_fast_impl: bool | None = None, **kwargs):
        if use_fast_impl is None:
            use_fast_impl = has_compiled_ops()
        super().__init__(dataset_name, *args, use_fast_impl=use_fast_impl, **kwargs)

    def _eval_predictions(self, predictions, img_ids=None):
        """Detectron2's, except that mask AP (``segm``) is computed on the images whose every ground-truth box has a
        mask (and the defect-free ones): a box-only image's masks are unknown, not wrong."""
        if self._tasks is not None and "segm" not in self._tasks or not any(
                "segmentation" in r for p in predictions for r in p.get("instances", [])):
            return super()._eval_predictions(predictions, img_ids)
        tasks = self._tasks
        masked = self.images_with_masks()
        try:
            self._tasks = tuple(t for t in (tasks or ("bbox",)) if t != "segm")
            super()._eval_predictions(predictions, img_ids)
            keep = sorted(masked if img_ids is None else masked & set(img_ids))
            if keep:
                self._logger.info("segm: evaluated on the %d of %d images whose boxes all have masks", len(keep),
                                  len(self._coco_api.getImgIds()))
                self._tasks = ("segm",)
                super()._eval_predictions(predictions, keep)
            else:
                self._logger.warning("segm: no image of this dataset has masks; mask AP not computed")
        finally:
            self._tasks = tasks

    def images_with_masks(self) -> set:
        """Ids of the ground-truth images whose annotations all have a segmentation (none: defect-free)."""
        by_image: dict = {i: True for i in self._coco_api.getImgIds()}
        for a in self._coco_api.dataset.get("annotations", []):
            by_image[a["image_id"]] = by_image.get(a["image_id"], True) and bool(a.get("segmentation"))
        return {i for i, ok in by_image.items() if ok}

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        if coco_eval is None:
            return results
        if self._output_dir:
            names = list(class_names) if class_names else [str(c) for c in coco_eval.params.catIds]
            name = PR_CURVES_FILE if iou_type == "bbox" else f"pr_curves_{iou_type}.json"
            write_json(os.path.join(self._output_dir, name), pr_curves_from_eval(coco_eval, names), indent=None,
                       sort_keys=False)
        if not class_names or len(class_names) <= 1:
            return results
        precisions = coco_eval.eval["precision"]  # (iou, recall, class, area, max dets)
        for thr, tag in ((0.5, "AP50"), (0.75, "AP75")):
            t = _iou_index(coco_eval, thr)
            for k, name in enumerate(class_names):
                p = precisions[t, :, k, 0, -1]
                p = p[p > -1]
                results[f"{tag}-{name}"] = float(np.mean(p) * 100) if p.size else float("nan")
        return results
