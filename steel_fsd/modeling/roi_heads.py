"""Detectron2's ``StandardROIHeads`` with another box predictor: the one thing steel-fsd's ROI heads change."""
from __future__ import annotations

from detectron2.modeling.roi_heads import StandardROIHeads

__all__ = ["BoxPredictorROIHeads"]


class BoxPredictorROIHeads(StandardROIHeads):
    """:class:`StandardROIHeads` whose box predictor is ``box_predictor_class(cfg, box head output shape)``;
    subclasses set the class and register themselves in ``ROI_HEADS_REGISTRY``."""

    box_predictor_class: type | None = None

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = cls.box_predictor_class(cfg, ret["box_head"].output_shape)
        return ret
