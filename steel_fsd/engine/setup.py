"""Config building for the tools: steel-fsd keys, device fallback, dataset pixel statistics."""
from __future__ import annotations

import json
import logging
import os

import torch
from detectron2.config import CfgNode, get_cfg

from ..config import add_steel_fsd_config

logger = logging.getLogger("steel_fsd")


def build_config(config_file: str, opts: list[str] | None = None) -> CfgNode:
    """Detectron2 defaults + steel-fsd keys, merged with ``config_file`` and ``KEY VALUE`` ``opts``."""
    cfg = get_cfg()
    add_steel_fsd_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts or [])
    return cfg


def resolve_device(cfg: CfgNode) -> None:
    """Use the CPU (with a warning) when the config asks for CUDA and none is available."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no CUDA device is available: running on cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def resolve_pixel_stats(cfg: CfgNode) -> None:
    """With INPUT.HARMONIZE.NORMALIZE, set MODEL.PIXEL_MEAN/STD to the training sets' statistics.

    The statistics are a deterministic function of the training datasets (and CLAHE settings), so a
    later ``--eval-only`` run recomputes the same values; they are cached in OUTPUT_DIR/pixel_stats.json.
    """
    if not cfg.INPUT.HARMONIZE.NORMALIZE:
        return
    from ..data.stats import pixel_stats
    from ..data.transforms import CLAHETransform

    key = {"datasets": list(cfg.DATASETS.TRAIN), "clahe": [cfg.INPUT.HARMONIZE.CLAHE, cfg.INPUT.HARMONIZE.CLAHE_CLIP,
           cfg.INPUT.HARMONIZE.CLAHE_TILES], "max_images": cfg.INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES}
    cache = os.path.join(cfg.OUTPUT_DIR, "pixel_stats.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = saved["mean"], saved["std"]
            return
    h = cfg.INPUT.HARMONIZE
    clahe = CLAHETransform(h.CLAHE_CLIP, h.CLAHE_TILES) if h.CLAHE else None
    mean, std = pixel_stats(list(cfg.DATASETS.TRAIN), h.NORMALIZE_MAX_IMAGES, clahe)
    logger.info("dataset pixel statistics of %s: mean %s std %s", key["datasets"], mean, std)
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = mean, std
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(cache, "w") as f:
        json.dump({"key": key, "mean": mean, "std": std}, f, indent=2)


def finalize_config(cfg: CfgNode) -> CfgNode:
    """Apply run-time resolution (device, pixel statistics) and freeze."""
    resolve_device(cfg)
    resolve_pixel_stats(cfg)
    cfg.freeze()
    return cfg
