"""Prototype calibration at test time (PCB, as in DeFRCN): each detection's score is blended with the cosine
similarity between its box feature and the support prototype of its predicted class.

``score' = alpha * score + (1 - alpha) * max(0, cos(f(box), mu_class))``, where ``f`` is the detector's own
box feature (the unit-norm embedding of a prototype head, else the box head's output) and ``mu_class`` the
mean feature of the class's K support boxes. A detection whose class has no prototype keeps its score.
The detector itself is unchanged: :class:`CalibratedRCNN` wraps a trained ``GeneralizedRCNN`` for inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes

from .inference import rcnn_stages

__all__ = ["box_features", "calibrated_scores", "CalibratedRCNN"]


def box_features(roi_heads, features: dict[str, torch.Tensor], boxes: list[Boxes]) -> torch.Tensor:
    """Features (sum of len(boxes), D) of given boxes, one list entry per image of ``features``: the
    prototype head's embedding if the ROI heads have one, else the box head's output."""
    if hasattr(roi_heads, "embed_boxes"):
        return roi_heads.embed_boxes(features, boxes)
    pooled = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
    return roi_heads.box_head(pooled).flatten(1)


def calibrated_scores(scores: torch.Tensor, classes: torch.Tensor, feats: torch.Tensor, prototypes: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """PCB scores. ``prototypes`` (C, D) may hold NaN rows (classes without support): those keep their score."""
    if len(scores) == 0:
        return scores
    mu = prototypes[classes]
    cos = F.cosine_similarity(feats, mu, dim=1).clamp(min=0)
    blended = alpha * scores + (1 - alpha) * cos
    return torch.where(torch.isnan(mu).any(1), scores, blended)


class CalibratedRCNN(torch.nn.Module):
    """A trained ``GeneralizedRCNN`` whose detections are rescored by :func:`calibrated_scores` (inference only;
    same inputs and outputs as the model's)."""

    def __init__(self, model: torch.nn.Module, prototypes: torch.Tensor, alpha: float = 0.5):
        super().__init__()
        self.model, self.alpha = model.eval(), float(alpha)
        self.register_buffer("prototypes", prototypes.float())

    def forward(self, batched_inputs):
        m = self.model
        images, features, _, results = rcnn_stages(m, batched_inputs)
        with torch.no_grad():
            feats = box_features(m.roi_heads, features, [r.pred_boxes for r in results]).split(
                [len(r) for r in results])
            for r, f in zip(results, feats):
                r.scores = calibrated_scores(r.scores, r.pred_classes, f, self.prototypes.to(f.device), self.alpha)
        return m._postprocess(results, batched_inputs, images.image_sizes)
