"""ROI heads that leave objectness-only boxes out of their samples (see ``steel_fsd/data/objectness.py``).

Instances of class -1 are boxes that train the RPN only. Before the ROI heads label and sample proposals, a
forward pre-hook (:func:`ignore_objectness_only`) removes these boxes from the targets and drops every proposal
whose IoU with one of them reaches ``MODEL.ROI_HEADS.IOU_THRESHOLDS[0]`` (the foreground threshold): such a
proposal is neither a defect of a known class nor background. Without targets (inference) the hook does nothing.
"""
from __future__ import annotations

from detectron2.structures import pairwise_iou
from torch import nn

__all__ = ["ignore_objectness_only"]


def ignore_objectness_only(roi_heads: nn.Module, iou: float):
    """Install the pre-hook on ``roi_heads`` (called as ``roi_heads(images, features, proposals, targets)``);
    returns its handle."""
    def hook(module, args):
        if len(args) < 4 or args[3] is None or not any((t.gt_classes < 0).any() for t in args[3]):
            return None
        proposals, targets = [], []
        for p, t in zip(args[2], args[3]):
            known = t.gt_classes >= 0
            if not known.all():
                overlap = pairwise_iou(p.proposal_boxes, t.gt_boxes[~known]).max(dim=1).values
                p = p[overlap < iou]
            proposals.append(p)
            targets.append(t[known])
        return (args[0], args[1], proposals, targets, *args[4:])
    return roi_heads.register_forward_pre_hook(hook)
