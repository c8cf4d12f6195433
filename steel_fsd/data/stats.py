"""Dataset pixel statistics for the "normalization with dataset mean/std" harmonization step."""
from __future__ import annotations

import numpy as np
from detectron2.data import DatasetCatalog

from .images import read_dataset_image


def pixel_stats(dataset_names: list[str], max_images: int = 200, clahe=None) -> tuple[list[float], list[float]]:
    """Per-channel (BGR) mean and std over up to ``max_images`` images of the datasets.

    Images are taken evenly spaced in the datasets' order (deterministic). ``clahe`` is an optional
    Detectron2 transform applied first, so the statistics match what the model sees.
    """
    dicts = [d for name in dataset_names for d in DatasetCatalog.get(name)]
    if not dicts:
        raise ValueError(f"datasets {dataset_names} are empty: cannot compute pixel statistics")
    idx = np.unique(np.linspace(0, len(dicts) - 1, num=min(max_images, len(dicts))).round().astype(int))
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in idx:
        img = read_dataset_image(dicts[i], "BGR")
        if clahe is not None:
            img = clahe.apply_image(img)
        px = img.reshape(-1, 3).astype(np.float64)
        total += px.sum(0)
        total_sq += (px ** 2).sum(0)
        count += len(px)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-6))
    return [round(float(v), 3) for v in mean], [round(float(v), 3) for v in std]
