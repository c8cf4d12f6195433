"""The versioned prototype file: named class prototypes and where they came from (support boxes, weights,
config); checking a file against a model and attaching it to the model's head. Choosing support boxes lives
in :mod:`steel_fsd.fewshot.support`, embedding them in the head (:meth:`PrototypeROIHeads.embed_boxes`),
building a file from both in :mod:`steel_fsd.fewshot.adapt`.

A prototype file is a plain ``torch.save`` dict of tensors, strings and numbers, read back with
``torch.load(weights_only=True)``: it never unpickles arbitrary objects.
"""
from __future__ import annotations

import datetime as _dt
import pickle
from dataclasses import asdict, dataclass, field

import torch

from detectron2.config import CfgNode

from ..modeling.checkpoint import atomic_save, is_torch_save_file
from ..utils.io import file_sha256

FORMAT = "steel_fsd.prototypes"
VERSION = 1


class PrototypeFileError(ValueError):
    """A prototype file that cannot be used (format, class names, embedding dim or model mismatch)."""


@dataclass
class PrototypeSet:
    """Prototypes of named classes and where they came from."""

    class_names: list[str]
    prototypes: torch.Tensor  # (C, D) float32
    shots: int
    seed: int
    support: list[dict] = field(default_factory=list)  # {class, image_key, file_name, bbox}
    weights_sha256: str = ""
    config: dict = field(default_factory=dict)
    created: str = ""

    @property
    def embed_dim(self) -> int:
        return int(self.prototypes.shape[1])

    def reordered(self, class_names: list[str]) -> "PrototypeSet":
        """The same prototypes in the order of ``class_names``, which must name exactly these classes."""
        if sorted(class_names) != sorted(self.class_names):
            missing = sorted(set(class_names) - set(self.class_names))
            extra = sorted(set(self.class_names) - set(class_names))
            raise PrototypeFileError(
                f"prototype classes {self.class_names} do not match the dataset's {list(class_names)}"
                f" (missing prototypes: {missing}, not in the dataset: {extra})")
        idx = [self.class_names.index(c) for c in class_names]
        return PrototypeSet(list(class_names), self.prototypes[idx], self.shots, self.seed, self.support,
                            self.weights_sha256, self.config, self.created)


def save_prototypes(ps: PrototypeSet, path: str) -> None:
    """Write ``ps`` as a versioned, weights-only-loadable file."""
    payload = asdict(ps)
    payload["prototypes"] = ps.prototypes.detach().cpu().float().contiguous()
    payload.update(format=FORMAT, version=VERSION, embed_dim=ps.embed_dim)
    atomic_save(payload, path)


def load_prototypes(path: str) -> PrototypeSet:
    """Read a prototype file, refusing pickled objects and validating its structure."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        if not is_torch_save_file(path):
            raise PrototypeFileError(f"{path}: not a prototype file (expected a .pt written by "
                                     "tools/register_support.py)") from None
        raise PrototypeFileError(f"{path}: not a steel-fsd prototype file, or it holds pickled objects that "
                                 f"are refused for safety ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PrototypeFileError(f"{path}: not a steel-fsd prototype file (format field missing)")
    if payload.get("version") != VERSION:
        raise PrototypeFileError(f"{path}: prototype file version {payload.get('version')}, this code reads {VERSION}")
    keys = ("shots", "seed", "support", "weights_sha256", "config", "created")
    missing = [k for k in ("prototypes", "class_names", "embed_dim", *keys) if k not in payload]
    if missing:
        raise PrototypeFileError(f"{path}: prototype file without the fields {missing}; rebuild it with "
                                 "tools/register_support.py")
    protos, names = payload["prototypes"], payload["class_names"]
    if not torch.is_tensor(protos) or not protos.is_floating_point() or not isinstance(names, (list, tuple)):
        raise PrototypeFileError(f"{path}: prototypes must be a float tensor and class_names a list")
    names = list(names)
    if any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1}, key=str)
        raise PrototypeFileError(f"{path}: class names must be distinct non-empty strings, got {names}"
                                 + (f" ({dup} repeated: every detection would take the first)" if dup else ""))
    if protos.ndim != 2 or protos.shape[0] != len(names) or protos.shape[1] != payload["embed_dim"]:
        raise PrototypeFileError(f"{path}: prototypes of shape {tuple(protos.shape)} do not match "
                                 f"{len(names)} classes x embed_dim {payload['embed_dim']}")
    if not torch.isfinite(protos).all():
        bad = sorted({names[i] for i in (~torch.isfinite(protos)).any(1).nonzero().flatten().tolist()})
        raise PrototypeFileError(f"{path}: prototypes of {bad} hold NaN or inf values; rebuild the file with "
                                 "tools/register_support.py")
    zero = [names[i] for i in (protos.norm(dim=1) == 0).nonzero().flatten().tolist()]
    if zero:
        raise PrototypeFileError(f"{path}: prototypes of {zero} are zero vectors (no direction: a cosine logit "
                                 "of 0 for every box); rebuild the file with tools/register_support.py")
    return PrototypeSet(names, protos, **{k: payload[k] for k in keys})


def append_class(ps: PrototypeSet, other: PrototypeSet) -> PrototypeSet:
    """Add the classes of ``other`` (e.g. one rare defect) to ``ps`` without touching existing ones."""
    clash = sorted(set(ps.class_names) & set(other.class_names))
    if clash:
        raise PrototypeFileError(f"classes {clash} already have prototypes")
    if other.embed_dim != ps.embed_dim:
        raise PrototypeFileError(f"embed dim {other.embed_dim} != {ps.embed_dim}")
    if other.weights_sha256 != ps.weights_sha256:
        raise PrototypeFileError("the two prototype sets were made with different model weights")
    return PrototypeSet(ps.class_names + other.class_names, torch.cat([ps.prototypes, other.prototypes.to(ps.prototypes)]),
                        ps.shots, ps.seed, ps.support + other.support, ps.weights_sha256, ps.config,
                        _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

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
