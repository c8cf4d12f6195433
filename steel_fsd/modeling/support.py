"""Using prototype files with a model: config provenance, checking a file against a model, attaching it."""
from __future__ import annotations

from detectron2.config import CfgNode

from ..utils.io import file_sha256
from .prototypes import PrototypeFileError, PrototypeSet, load_prototypes

RELEVANT_KEYS = ("MODEL.META_ARCHITECTURE", "MODEL.RESNETS.DEPTH", "MODEL.ROI_HEADS.NAME", "MODEL.PROTOTYPE.EMBED_DIM",
                 "MODEL.PROTOTYPE.EMBED_NORM", "MODEL.PROTOTYPE.LOGIT",
                 "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.HARMONIZE.RESIZE", "INPUT.HARMONIZE.RESIZE_POLICY",
                 "INPUT.HARMONIZE.CLAHE", "DATASETS.TRAIN")


def relevant_config(cfg: CfgNode) -> dict:
    """The config keys that decide what an embedding means, as plain values (for the prototype file)."""
    out = {}
    for key in RELEVANT_KEYS:
        node = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = list(node) if isinstance(node, (tuple, list)) else node
    return out


def check_prototypes(ps: PrototypeSet, path: str, embed_dim: int, weights: str) -> None:
    """Raise :class:`PrototypeFileError` if ``ps`` was not made for this model."""
    if ps.embed_dim != embed_dim:
        raise PrototypeFileError(f"{path}: embed dim {ps.embed_dim} but the model's MODEL.PROTOTYPE.EMBED_DIM is {embed_dim}")
    if ps.weights_sha256 and weights:
        actual = file_sha256(weights)
        if actual != ps.weights_sha256:
            raise PrototypeFileError(f"{path}: made with weights sha256 {ps.weights_sha256[:12]}..., but MODEL.WEIGHTS "
                                     f"{weights} has {actual[:12]}...: re-run tools/register_support.py with these weights")


def attach_support(model, cfg: CfgNode, class_names: list[str]) -> PrototypeSet | None:
    """Load MODEL.PROTOTYPE.SUPPORT_FILE (if set) into the model, ordered as ``class_names``."""
    path = cfg.MODEL.PROTOTYPE.SUPPORT_FILE
    if not path:
        return None
    predictor = model.roi_heads.box_predictor
    if not hasattr(predictor, "set_support"):
        raise PrototypeFileError(f"MODEL.PROTOTYPE.SUPPORT_FILE is set but {cfg.MODEL.ROI_HEADS.NAME} has no prototype head")
    ps = load_prototypes(path)
    check_prototypes(ps, path, predictor.embed.out_features, cfg.MODEL.WEIGHTS)
    ps = ps.reordered(list(class_names))
    predictor.set_support(ps.prototypes, ps.class_names)
    return ps
