"""Gradient-decoupled layers between the backbone and the two heads (DeFRCN's GDL), as a registered meta-arch.

The RPN and the ROI heads each see the backbone features through their own layer: the identity forward followed
by a learned per-channel affine map, and in the backward pass the gradient that flows back into the backbone
multiplied by a per-branch factor (``MODEL.GDL.RPN_SCALE``, ``MODEL.GDL.ROI_SCALE``). A factor of 0 stops the
branch from shaping the shared features (its own layers still learn), 1 leaves the gradient as it is. The
affine maps decouple the two branches in the forward pass: each can rescale the features it reads without
changing what the other reads.

:class:`DecoupledRCNN` is Detectron2's ``GeneralizedRCNN`` with these layers put in front of the proposal
generator and of the ROI poolers by forward pre-hooks, so every path that reads features through them (training,
inference, support embeddings, calibration, diagnosis) sees the same decoupled features. Select it with
``MODEL.META_ARCHITECTURE: DecoupledRCNN``.
"""
from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from torch import nn

__all__ = ["scale_gradient", "ChannelAffine", "DecoupledRCNN"]

_POOLERS = ("box_pooler", "mask_pooler", "keypoint_pooler", "pooler")  # StandardROIHeads, Res5ROIHeads


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    return x if scale == 1.0 else _ScaleGradient.apply(x, float(scale))


class ChannelAffine(nn.Module):
    """``x * weight + bias`` per channel of (N, C, H, W) features; starts as the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


@META_ARCH_REGISTRY.register()
class DecoupledRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` with a gradient-decoupled layer before the RPN and one before the ROI poolers.

    Parameters ``rpn_affine.*`` and ``roi_affine.*`` are new; weights of a plain ``GeneralizedRCNN`` load into it
    with these at the identity (``MODEL.FREEZE`` prefixes apply to them as to any other module).
    """

    @configurable
    def __init__(self, *, rpn_scale: float, roi_scale: float, **kwargs):
        super().__init__(**kwargs)
        if rpn_scale < 0 or roi_scale < 0:
            raise ValueError(f"MODEL.GDL.RPN_SCALE {rpn_scale} / ROI_SCALE {roi_scale}: gradient factors must be >= 0")
        channels = {s.channels for s in self.backbone.output_shape().values()}
        if len(channels) != 1:
            raise ValueError(f"DecoupledRCNN needs backbone outputs of one width, got {sorted(channels)}")
        width = channels.pop()
        self.rpn_scale, self.roi_scale = float(rpn_scale), float(roi_scale)
        self.rpn_affine, self.roi_affine = ChannelAffine(width), ChannelAffine(width)
        if self.proposal_generator is not None:
            self.proposal_generator.register_forward_pre_hook(self._rpn_inputs)
        for name in _POOLERS:
            pooler = getattr(self.roi_heads, name, None)
            if isinstance(pooler, nn.Module):
                pooler.register_forward_pre_hook(self._pooler_inputs)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(rpn_scale=cfg.MODEL.GDL.RPN_SCALE, roi_scale=cfg.MODEL.GDL.ROI_SCALE)
        return ret

    def rpn_features(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The backbone features as the RPN reads them."""
        return {k: self.rpn_affine(scale_gradient(v, self.rpn_scale)) for k, v in features.items()}

    def roi_features(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """The feature maps given to an ROI pooler, as the ROI heads read them."""
        return [self.roi_affine(scale_gradient(v, self.roi_scale)) for v in x]

    def _rpn_inputs(self, module, args):  # (images, features, gt_instances)
        return (args[0], self.rpn_features(args[1]), *args[2:])

    def _pooler_inputs(self, module, args):  # (feature maps, boxes)
        return (self.roi_features(args[0]), *args[1:])
