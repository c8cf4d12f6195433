"""Detectron2's Mask R-CNN head, trained on mixed data: images whose annotations have masks (Severstal RLE, the
magnetic-tile set, COCO polygons) and box-only images (NEU-DET) in the same batch.

``MODEL.ROI_MASK_HEAD.NAME PartialMaskRCNNHead`` (with ``MODEL.MASK_ON``): the mask loss is Detectron2's
``mask_rcnn_loss`` over the foreground proposals of the images that carry ``gt_masks``; proposals of box-only
images still train the boxes but add nothing to the mask loss (their masks are unknown, not empty). A batch
without any mask gives a zero mask loss that keeps the head in the graph. Inference is the parent's.
``MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK True`` suits the prototype head, whose classes change by prototype swap.
"""
from __future__ import annotations

import torch
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead, mask_rcnn_loss

__all__ = ["PartialMaskRCNNHead", "images_with_masks"]


def images_with_masks(instances: list) -> list[bool]:
    """Per image of a training batch: whether its proposals carry ``gt_masks``."""
    return [x.has("gt_masks") for x in instances]


@ROI_MASK_HEAD_REGISTRY.register()
class PartialMaskRCNNHead(MaskRCNNConvUpsampleHead):
    """:class:`MaskRCNNConvUpsampleHead` whose training loss counts only the images that have masks."""

    def forward(self, x, instances: list):
        x = self.layers(x)
        if not self.training:
            from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference

            mask_rcnn_inference(x, instances)
            return instances
        has = images_with_masks(instances)
        sizes = [len(i) for i in instances]
        rows = torch.cat([torch.full((n,), bool(h), dtype=torch.bool, device=x.device) for n, h in zip(sizes, has)]) \
            if sizes else torch.zeros(0, dtype=torch.bool, device=x.device)
        kept = [i for i, h in zip(instances, has) if h]
        if not kept or not rows.any():
            return {"loss_mask": x.sum() * 0.0}
        return {"loss_mask": mask_rcnn_loss(x[rows], kept, self.vis_period) * self.loss_weight}
