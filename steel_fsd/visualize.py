"""Overlay PNGs of predictions (and ground truth) on dataset images."""
from __future__ import annotations

import numpy as np
from detectron2.structures import BoxMode, Instances
from detectron2.utils.visualizer import Visualizer

from .data.images import read_dataset_image


def draw_predictions(dataset_dict: dict, instances: Instances, metadata, score_thresh: float = 0.5,
                     scale: float = 2.0) -> np.ndarray:
    """RGB image with ground-truth boxes (green, dashed-free thin) and predictions scoring >= ``score_thresh``."""
    img = read_dataset_image(dataset_dict, "RGB")
    vis = Visualizer(img, metadata=metadata, scale=scale)
    for ann in dataset_dict.get("annotations", []):
        box = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
        vis.draw_box(box, edge_color="lime", line_style="--")
    keep = instances[instances.scores >= score_thresh].to("cpu")
    return vis.draw_instance_predictions(keep).get_image()


def grid(images: list[np.ndarray], cols: int = 3) -> np.ndarray:
    """Tile equally-typed RGB images (padded to the largest) into one image."""
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    rows = (len(images) + cols - 1) // cols
    out = np.full((rows * h, min(cols, len(images)) * w, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        out[r * h:r * h + im.shape[0], c * w:c * w + im.shape[1]] = im
    return out
