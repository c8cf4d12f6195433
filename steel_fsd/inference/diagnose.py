"""Novel-class failure analysis: run a model over a dataset and record, for every ground-truth box, whether the
RPN proposed it and what the detector made of it (:mod:`steel_fsd.evaluation.failures`)."""
from __future__ import annotations

import logging
import time

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..data.mapper import SteelDatasetMapper
from ..evaluation.failures import failure_table, gt_outcomes
from ..modeling.inference import rcnn_stages

logger = logging.getLogger(__name__)


@torch.no_grad()
def diagnose(model, cfg: CfgNode, dataset: str, novel: list[str], ks: tuple[int, ...] = (100, 300),
             iou: float = 0.5, score_thresh: float = 0.05) -> tuple[list[dict], list[dict]]:
    """(per-class failure table, per-box records) of ``model`` (a ``GeneralizedRCNN`` in eval mode, with its
    support prototypes if any) on ``dataset``; ``novel`` names classes of the dataset."""
    names = list(MetadataCatalog.get(dataset).thing_classes)
    unknown = sorted(set(novel) - set(names))
    if unknown:
        raise ValueError(f"novel classes {unknown} are not classes of {dataset} ({names})")
    novel_ids = {names.index(n) for n in novel}
    mapper = SteelDatasetMapper(cfg, is_train=False)
    dicts = DatasetCatalog.get(dataset)
    model.eval()
    records, start = [], time.perf_counter()
    for n, d in enumerate(dicts, 1):
        inp = mapper(dict(d))
        images, _, proposals, results = rcnn_stages(model, [inp])
        det = model._postprocess(results, [inp], images.image_sizes)[0]["instances"].to("cpu")
        h, w = images.image_sizes[0]
        scale = torch.tensor([d["width"] / w, d["height"] / h] * 2)
        props = proposals[0].proposal_boxes.tensor.cpu() * scale  # sorted by objectness, as the RPN returns them
        anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        gt = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
                          dtype=torch.float32).reshape(-1, 4)
        records += gt_outcomes(gt, torch.tensor([a["category_id"] for a in anns], dtype=torch.long), props,
                               det.pred_boxes.tensor, det.pred_classes, det.scores, novel_ids, iou, ks, score_thresh)
        if n % 50 == 0 or n == len(dicts):
            el = time.perf_counter() - start
            logger.info("diagnose %s: %d/%d images, ETA %.0f s", dataset, n, len(dicts), el / n * (len(dicts) - n))
    return failure_table(records, names, novel_ids, ks), records
