"""TFA's cosine-similarity box classifier (Wang et al., 2020, "Frustratingly Simple Few-Shot Object Detection"):
the class scores are ``scale * cos(x, w_c)`` between the box feature and each class's weight row, background
included, so novel classes fine-tuned from K shots are not dwarfed by the norms of base-class weights.

Registered as ``MODEL.ROI_HEADS.NAME: CosineROIHeads``; ``MODEL.ROI_BOX_HEAD.COSINE_SCALE`` is the scale (TFA:
20). The layer keeps ``cls_score`` (weight and bias) so a stock Faster R-CNN checkpoint, resized by
``tools/ckpt_surgery.py``, loads into it unchanged; the bias is not used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from .roi_heads import BoxPredictorROIHeads

__all__ = ["cosine_scores", "CosineOutputLayers", "CosineROIHeads"]


def cosine_scores(x: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * cos(x_i, w_c)`` for every row of ``x`` (N, D) and of ``weight`` (C, D)."""
    return scale * (F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t())


class CosineOutputLayers(FastRCNNOutputLayers):
    """:class:`FastRCNNOutputLayers` whose class scores are :func:`cosine_scores`."""

    @configurable
    def __init__(self, input_shape, *, cosine_scale: float = 20.0, **kwargs):
        super().__init__(input_shape, **kwargs)
        if cosine_scale <= 0:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.COSINE_SCALE must be > 0, got {cosine_scale}")
        self.cosine_scale = float(cosine_scale)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["cosine_scale"] = cfg.MODEL.ROI_BOX_HEAD.COSINE_SCALE
        return ret

    def forward(self, x):
        x = x.flatten(1)
        return cosine_scores(x, self.cls_score.weight, self.cosine_scale), self.bbox_pred(x)


@ROI_HEADS_REGISTRY.register()
class CosineROIHeads(BoxPredictorROIHeads):
    """:class:`StandardROIHeads` whose box predictor is :class:`CosineOutputLayers`."""

    box_predictor_class = CosineOutputLayers
