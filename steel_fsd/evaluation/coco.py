"""COCO evaluation with per-class AP50/AP75 beside Detectron2's per-class AP."""
from __future__ import annotations

import numpy as np
from detectron2.evaluation import COCOEvaluator

from ..utils.env import has_compiled_ops


class SteelCOCOEvaluator(COCOEvaluator):
    """Detectron2's :class:`COCOEvaluator` that also reports ``AP50-<class>`` and ``AP75-<class>``.

    ``use_fast_impl`` defaults to Detectron2's C++ COCOeval only when the compiled ops exist.
    """

    def __init__(self, dataset_name: str, *args, use_fast_impl: bool | None = None, **kwargs):
        if use_fast_impl is None:
            use_fast_impl = has_compiled_ops()
        super().__init__(dataset_name, *args, use_fast_impl=use_fast_impl, **kwargs)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        if coco_eval is None or not class_names or len(class_names) <= 1:
            return results
        precisions = coco_eval.eval["precision"]  # (iou, recall, class, area, max dets)
        iou_thrs = list(np.round(coco_eval.params.iouThrs, 2))
        for thr, tag in ((0.5, "AP50"), (0.75, "AP75")):
            t = iou_thrs.index(thr)
            for k, name in enumerate(class_names):
                p = precisions[t, :, k, 0, -1]
                p = p[p > -1]
                results[f"{tag}-{name}"] = float(np.mean(p) * 100) if p.size else float("nan")
        return results
