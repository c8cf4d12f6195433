"""A ``GeneralizedRCNN``'s inference in its stages, for code that needs more than the final detections (the
backbone features of the detections, the RPN proposals)."""
from __future__ import annotations

import torch

__all__ = ["rcnn_stages"]


@torch.no_grad()
def rcnn_stages(model, batched_inputs: list[dict]):
    """``(images, features, proposals, results)`` of ``model.inference`` without post-processing: proposals per
    image sorted by objectness, results (Instances) in the model's input pixels; the model's own
    ``_postprocess(results, batched_inputs, images.image_sizes)`` maps them to the original images."""
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    results, _ = model.roi_heads(images, features, proposals, None)
    return images, features, proposals, results
