"""Config building for the tools: steel-fsd keys, device fallback, dataset pixel statistics."""
from __future__ import annotations

import logging
import math
import os
import re

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog

from ..config import add_steel_fsd_config
from ..data.catalog import require_registered
from ..utils.cli import check_output_dir
from ..utils.errors import UserError
from ..utils.io import read_json, read_yaml, write_json, yaml_error

logger = logging.getLogger("steel_fsd")


def build_config(config_file: str, opts: list[str] | None = None) -> CfgNode:
    """Detectron2 defaults + steel-fsd keys, merged with ``config_file`` and ``KEY VALUE`` ``opts``.

    A missing file, an unknown key or a malformed override raises :class:`UserError` naming it.
    """
    if not os.path.isfile(config_file):
        raise UserError(f"config file {config_file} not found", f"(working directory {os.getcwd()})",
                        "give the path of a YAML file, e.g. configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml")
    doc = read_yaml(config_file, "config")
    if not isinstance(doc, dict):
        raise UserError(f"config file {config_file} holds {'nothing' if doc is None else type(doc).__name__}, not a "
                        "mapping of KEY: value", "", "a config is a YAML mapping, e.g. '_BASE_: ../Base-RCNN-FPN.yaml' "
                        "then its keys")
    cfg = get_cfg()
    add_steel_fsd_config(cfg)
    # allow_unsafe=False: Detectron2 otherwise falls back to yaml.unsafe_load, which runs a python tag's code
    merge_file = lambda: cfg.merge_from_file(config_file, allow_unsafe=False)  # noqa: E731
    for where, merge in ((f"in {config_file} (or a _BASE_ it names)", merge_file),
                         ("in the command-line KEY VALUE overrides", lambda: cfg.merge_from_list(list(opts or [])))):
        try:
            merge()
        except yaml.constructor.ConstructorError as e:  # the file (a _BASE_ perhaps) is the error mark's
            raise yaml_error(e, "config", e.problem_mark.name if e.problem_mark else config_file) from None
        except (TypeError, AttributeError) as e:  # a YAML document that is not a mapping (empty, a list, a scalar)
            if merge is not merge_file:
                raise
            raise UserError(f"a config file is not a mapping of KEY: value ({type(e).__name__}: {e})", where,
                            "a config is a YAML mapping, e.g. '_BASE_: ../Base-RCNN-FPN.yaml' then keys") from None
        except (KeyError, AssertionError, yaml.YAMLError) as e:
            key = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(e))
            if key:
                raise UserError(f"unknown config key {key.group(1)}", where, "check its spelling against "
                                "steel_fsd/config.py and Detectron2's config defaults") from None
            raise UserError(f"malformed config ({' '.join(str(e).split()) or type(e).__name__})", where,
                            "overrides come in KEY VALUE pairs with values of the key's type") from None
    return cfg


def resolve_device(cfg: CfgNode) -> None:
    """Use the CPU (with a warning) when the config asks for CUDA and none is available."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no CUDA device is available: running on cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def resolve_pixel_stats(cfg: CfgNode, weights: str | None = None) -> None:
    """With INPUT.HARMONIZE.NORMALIZE, set MODEL.PIXEL_MEAN/STD to the training sets' statistics.

    The statistics are a deterministic function of the training datasets (and CLAHE settings), so a
    later ``--eval-only`` run recomputes the same values; they are cached in OUTPUT_DIR/pixel_stats.json.
    With ``weights``, the training run's own cache (``pixel_stats.json`` next to the weights) is used whatever
    datasets the config names: a model is applied with the statistics it was trained with (e.g. a protocol base
    model trained on a class subset, applied with the full dataset's config), and tools that only apply a
    trained model need not have its training datasets registered.
    """
    if not cfg.INPUT.HARMONIZE.NORMALIZE:
        return
    from ..data.stats import pixel_stats
    from ..data.transforms import CLAHETransform

    from ..data.catalog import dataset_digest

    h = cfg.INPUT.HARMONIZE
    settings = {"datasets": list(cfg.DATASETS.TRAIN), "clahe": [h.CLAHE, h.CLAHE_CLIP, h.CLAHE_TILES],
                "max_images": h.NORMALIZE_MAX_IMAGES}
    cache = os.path.abspath(os.path.join(cfg.OUTPUT_DIR, "pixel_stats.json"))
    trained = os.path.join(os.path.dirname(os.path.abspath(weights)), "pixel_stats.json") if weights else None
    if trained and os.path.isfile(trained):  # the trained model's own statistics, whatever the key
        saved = _read_pixel_stats(trained, cfg.MODEL.PIXEL_MEAN)
        if {k: v for k, v in saved.get("key", {}).items() if k != "content"} != settings:
            logger.info("pixel statistics of the trained model (%s, trained on %s)", trained,
                        saved.get("key", {}).get("datasets"))
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = saved["mean"], saved["std"]
        if trained != cache:  # the output folder records the statistics it was run with
            write_json(cache, saved, indent=2, sort_keys=False)
        return
    # the cache key needs the datasets' content (loading them): only computed when no trained statistics apply
    key = {**settings, "content": [dataset_digest(n) if n in DatasetCatalog.list() else None
                                   for n in cfg.DATASETS.TRAIN]}
    if os.path.isfile(cache):
        saved = _read_pixel_stats(cache, cfg.MODEL.PIXEL_MEAN)
        if saved.get("key") == key:
            cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = saved["mean"], saved["std"]
            return
    for name in cfg.DATASETS.TRAIN:
        require_registered(name, "DATASETS.TRAIN (INPUT.HARMONIZE.NORMALIZE computes its pixel statistics; a "
                           f"copy of the training run's pixel_stats.json in OUTPUT_DIR {cfg.OUTPUT_DIR} also does)")
    clahe = CLAHETransform(h.CLAHE_CLIP, h.CLAHE_TILES) if h.CLAHE else None
    mean, std = pixel_stats(list(cfg.DATASETS.TRAIN), h.NORMALIZE_MAX_IMAGES, clahe)
    logger.info("dataset pixel statistics of %s: mean %s std %s", key["datasets"], mean, std)
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = mean, std
    write_json(cache, {"key": key, "mean": mean, "std": std}, indent=2, sort_keys=False)


def _read_pixel_stats(path: str, like: list) -> dict:
    """A ``pixel_stats.json``: mean and std with one finite number per channel of ``like``, every std > 0 (a std
    of 0 divides the image by zero: no detection at all). :class:`UserError` naming the file otherwise."""
    saved = read_json(path, "pixel statistics file")
    mean, std = (saved.get(k) if isinstance(saved, dict) else None for k in ("mean", "std"))
    ok = all(isinstance(v, list) and len(v) == len(like) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v) for v in (mean, std))
    if not ok or min(std) <= 0:
        raise UserError(f"pixel statistics file {path} is invalid (mean {mean!r}, std {std!r}: {len(like)} finite "
                        "values each, every std > 0)", "", "delete it: the statistics are recomputed from the "
                        "training datasets (or copy the training run's pixel_stats.json)")
    return saved


def check_config_paths(cfg: CfgNode, datasets: tuple[str, ...] = ("TRAIN", "TEST")) -> None:
    """The config's ``DATASETS.<key>`` datasets for each key in ``datasets`` (and TEST.VAL_LOSS_DATASET when
    training) are registered and not empty, and OUTPUT_DIR is writable (:class:`UserError` if not)."""
    for key in datasets:
        for name in cfg.DATASETS[key]:
            require_registered(name, f"DATASETS.{key}", nonempty=True)
    if cfg.TEST.VAL_LOSS_DATASET and "TRAIN" in datasets:
        require_registered(cfg.TEST.VAL_LOSS_DATASET, "TEST.VAL_LOSS_DATASET")
    if "TRAIN" in datasets:  # category ids beyond NUM_CLASSES would index past the classifier
        from detectron2.data import MetadataCatalog

        for name in cfg.DATASETS.TRAIN:
            classes = MetadataCatalog.get(name).get("thing_classes") or []
            if len(classes) > cfg.MODEL.ROI_HEADS.NUM_CLASSES:
                raise UserError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but {name} has "
                                f"{len(classes)} classes {classes}", "in the config",
                                f"set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}")
    check_output_dir(cfg.OUTPUT_DIR)


def use_trained_class_count(cfg: CfgNode, weights: str) -> None:
    """For a prototype swap, whose prototype file decides the predicted classes: build the model with the
    number of classes its checkpoint was trained with (stored in steel-fsd checkpoints), e.g. a base model of
    4 classes under a 6-class config."""
    from ..modeling.checkpoint import checkpoint_classes, read_weights_file

    names = checkpoint_classes(read_weights_file(weights))
    if names and len(names) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        logger.info("%s was trained on %d classes %s: MODEL.ROI_HEADS.NUM_CLASSES %d -> %d for the prototype swap",
                    weights, len(names), names, cfg.MODEL.ROI_HEADS.NUM_CLASSES, len(names))
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(names)


def finalize_config(cfg: CfgNode, datasets: tuple[str, ...] = ("TRAIN", "TEST"), weights: str | None = None,
                    swap: bool = False) -> CfgNode:
    """Check the datasets named by ``datasets`` (see :func:`check_config_paths`; ``()`` for tools that use
    only their own datasets, e.g. register_support) and OUTPUT_DIR, apply run-time resolution (device,
    pixel statistics, read from beside ``weights`` when that run cached them) and freeze. ``swap``: the
    weights will predict a prototype file's classes (:func:`use_trained_class_count`)."""
    if swap and weights and os.path.isfile(weights):
        use_trained_class_count(cfg, weights)
    check_config_values(cfg)
    check_config_paths(cfg, datasets)
    resolve_device(cfg)
    resolve_pixel_stats(cfg, weights)
    cfg.freeze()
    return cfg


#: (key, test, what it must be): values that would crash deep inside training or give silent nonsense
_POSITIVE_INTS = ("SOLVER.IMS_PER_BATCH", "SOLVER.MAX_ITER", "SOLVER.CHECKPOINT_PERIOD", "MODEL.ROI_HEADS.NUM_CLASSES",
                  "MODEL.PROTOTYPE.EMBED_DIM", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "TEST.DETECTIONS_PER_IMAGE",
                  "INPUT.HARMONIZE.RESIZE")
# [low, high] pairs
_RANGES = ("INPUT.AUG.GAMMA_RANGE", "INPUT.AUG.CROP_RANGE", "MODEL.PROTOTYPE.TAU_RANGE")
_UNIT_FLOATS = ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "MODEL.ROI_HEADS.NMS_THRESH_TEST", "TEST.PRF_SCORE_THRESH",
                "MODEL_EMA.DECAY")


def _get(cfg: CfgNode, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return None
        node = node[part]
    return node


def check_config_values(cfg: CfgNode) -> None:
    """Values that would crash deep inside Detectron2 or give silent nonsense are refused here, each naming its
    key: sizes, counts and periods must be positive integers, thresholds in [0, 1], the device cpu or cuda[:N]."""
    for key in _POSITIVE_INTS:
        v = _get(cfg, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"{key} is {v!r}", "in the config", "it must be a positive integer")
    for key in _UNIT_FLOATS:
        v = _get(cfg, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
            raise UserError(f"{key} is {v!r}", "in the config", "it must be a number in [0, 1]")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(cfg.MODEL.DEVICE)):
        raise UserError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r}", "in the config (or --device)",
                        "use cpu or cuda (cuda:N for one GPU of several)")
    if float(cfg.SOLVER.BASE_LR) <= 0 or not math.isfinite(float(cfg.SOLVER.BASE_LR)):
        raise UserError(f"SOLVER.BASE_LR is {cfg.SOLVER.BASE_LR!r}", "in the config", "it must be a positive number")
    for key in _RANGES:
        v = _get(cfg, key)
        if v is not None and (len(v) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
                              or v[0] > v[1]):
            raise UserError(f"{key} is {list(v)!r}", "in the config", "it must be [low, high] with low <= high")
    steps = list(cfg.SOLVER.STEPS)
    if any(not isinstance(x, int) or x < 1 for x in steps) or steps != sorted(steps):
        raise UserError(f"SOLVER.STEPS is {tuple(steps)!r}", "in the config",
                        "it must be increasing iteration numbers, e.g. (380, 460) for SOLVER.MAX_ITER 500")
