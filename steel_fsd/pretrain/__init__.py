"""Backbone pretraining without downloads: contrastive losses (SimCLR's NT-Xent, NNCLR's nearest-neighbour
positives) and conversion of a torchvision ResNet state dict a user already has on disk into Detectron2's
backbone names."""
from .contrastive import SupportQueue, nnclr_loss, nt_xent
from .convert import backbone_prefix, torchvision_to_detectron2

__all__ = ["SupportQueue", "backbone_prefix", "nnclr_loss", "nt_xent", "torchvision_to_detectron2"]
