"""Loading a trained model for evaluation, prediction or adaptation, and the checks that its weights and classes
fit the config: one place for every tool that loads a model."""
from __future__ import annotations

import os

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from ..fewshot.prototypes import attach_support
from ..modeling.checkpoint import SafeCheckpointer
from ..utils.errors import UserError


class WeightsError(ValueError):
    """MODEL.WEIGHTS names a file that cannot be read."""


def check_weights(path: str) -> None:
    """Raise :class:`WeightsError` with a way forward if ``path`` (local or URL) cannot be read."""
    if not path:
        return
    try:
        local = PathManager.get_local_path(path)
        ok = os.path.isfile(local) and os.access(local, os.R_OK)
        reason = "no such readable file"
    except Exception as e:  # download or handler failures: offline machines, bad URLs
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        raise WeightsError(
            f"MODEL.WEIGHTS '{path}' cannot be read ({reason}). Download the weights and pass their local path "
            "(MODEL.WEIGHTS /path/R-50.pkl), or train from scratch with MODEL.WEIGHTS \"\" — the *_scratch_GN "
            "configs do this with GroupNorm, the usual choice without pretraining.")


def load_model_for_eval(cfg: CfgNode, resume: bool = False, check_classes: bool = True,
                        payload: dict | None = None) -> torch.nn.Module:
    """Build the model of ``cfg`` in eval mode and load MODEL.WEIGHTS (or the last checkpoint with ``resume``),
    then MODEL.PROTOTYPE.SUPPORT_FILE if set.

    Raises :class:`UserError` when there are no weights, when the checkpoint does not fit the config
    (missing weights or other head shapes: evaluating would use random layers), and, with
    ``check_classes`` and no support file (which maps classes by name), when the model's classes (stored
    in the checkpoint, else the config's count) differ from the DATASETS.TEST classes. ``payload``: MODEL.WEIGHTS
    as :func:`read_weights_file` returned it, when the caller has read it already (it is not read again).
    """
    model = build_model(cfg).eval()  # (Trainer.build_model would also log the whole architecture)
    checkpointer = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR,
                                    preread=(cfg.MODEL.WEIGHTS, payload) if payload is not None else None)
    resumed = resume and checkpointer.has_checkpoint()
    if not resumed:
        if not cfg.MODEL.WEIGHTS:
            raise UserError("no weights to evaluate (MODEL.WEIGHTS is empty)", "",
                            "pass MODEL.WEIGHTS path/to/model_final.pth, or --resume with OUTPUT_DIR holding a "
                            "last_checkpoint")
        check_weights(cfg.MODEL.WEIGHTS)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    source = checkpointer.get_checkpoint_file() if resumed else cfg.MODEL.WEIGHTS
    check_loaded(checkpointer.last_incompatible, source)
    if cfg.MODEL.PROTOTYPE.SUPPORT_FILE:
        attach_support(model, cfg, test_class_names(cfg))
    elif check_classes:
        check_classes_match(cfg, checkpointer.last_classes, source)
    return model


def check_loaded(incompatible, source: str) -> None:
    """:class:`UserError` if loading ``source`` left model weights missing or skipped mismatched shapes."""
    if incompatible is None:
        return
    reshaped = {k for k, _, _ in incompatible.incorrect_shapes}
    missing = [k for k in incompatible.missing_keys if k not in reshaped]
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} of the model's weights (e.g. {', '.join(missing[:3])})",
                        source, "it was trained with another architecture: use the config it was trained with")
    if incompatible.incorrect_shapes:
        shown = "; ".join(f"{k}: checkpoint {tuple(a)} vs config {tuple(b)}" for k, a, b in incompatible.incorrect_shapes[:3])
        more = len(incompatible.incorrect_shapes) - 3
        raise UserError(f"the checkpoint's layers do not match the config ({shown}{f'; {more} more' if more > 0 else ''})",
                        source, "evaluate with the config (and MODEL.*.NUM_CLASSES) the model was trained with")


def model_num_classes(cfg: CfgNode) -> int:
    """The number of classes the config's detector predicts."""
    return cfg.MODEL.RETINANET.NUM_CLASSES if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else cfg.MODEL.ROI_HEADS.NUM_CLASSES


def check_classes_match(cfg: CfgNode, stored: list[str] | None, source: str) -> None:
    """:class:`UserError` if the model's classes (``stored`` in its checkpoint, else the config's count) are
    not the DATASETS.TEST classes."""
    test = test_class_names(cfg)
    n = model_num_classes(cfg)
    if (stored is not None and list(stored) != list(test)) or n != len(test):
        model = f"classes {list(stored)}" if stored is not None else f"{n} classes (config)"
        raise UserError(f"the model's {model} differ from the {len(test)} classes {test} of {list(cfg.DATASETS.TEST)}",
                        source, "evaluate on a dataset with the model's classes, or adapt the model to these: "
                        "tools/register_support.py (prototype models, classes matched by name) or "
                        "tools/ckpt_surgery.py and fine-tuning")


def train_class_names(cfg: CfgNode) -> list[str] | None:
    """The class names of DATASETS.TRAIN (None when the datasets disagree or none is given)."""
    names = [list(MetadataCatalog.get(d).get("thing_classes", [])) for d in cfg.DATASETS.TRAIN]
    return names[0] if names and names[0] and all(n == names[0] for n in names) else None


def train_tile(cfg: CfgNode) -> int | None:
    """The tile size DATASETS.TRAIN was cut into (``tile`` in its metadata, e.g. 256 for Severstal's tiled
    strips), 0 when every training dataset holds whole images, None when they disagree."""
    tiles = {MetadataCatalog.get(d).get("tile") or 0 for d in cfg.DATASETS.TRAIN}
    return tiles.pop() if len(tiles) == 1 and isinstance(next(iter(tiles)), int) else None


def test_class_names(cfg: CfgNode) -> list[str]:
    """The class names shared by every DATASETS.TEST dataset (a prototype file must match them)."""
    names = [list(MetadataCatalog.get(d).thing_classes) for d in cfg.DATASETS.TEST]
    if any(n != names[0] for n in names):
        raise ValueError(f"DATASETS.TEST {list(cfg.DATASETS.TEST)} have different classes: evaluate them in separate runs")
    return names[0]
