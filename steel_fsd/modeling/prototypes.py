"""Class prototypes from K support instances: sampling, embedding, and the versioned prototype file.

A prototype file is a plain ``torch.save`` dict of tensors, strings and numbers, read back with
``torch.load(weights_only=True)``: it never unpickles arbitrary objects.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import pickle
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from detectron2.structures import Boxes, BoxMode

from .checkpoint import atomic_save

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


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (used to tie prototypes to the model weights that made them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        raise PrototypeFileError(f"{path}: not a steel-fsd prototype file, or it holds pickled objects that "
                                 f"are refused for safety ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PrototypeFileError(f"{path}: not a steel-fsd prototype file (format field missing)")
    if payload.get("version") != VERSION:
        raise PrototypeFileError(f"{path}: prototype file version {payload.get('version')}, this code reads {VERSION}")
    protos, names = payload["prototypes"], list(payload["class_names"])
    if protos.ndim != 2 or protos.shape[0] != len(names) or protos.shape[1] != payload["embed_dim"]:
        raise PrototypeFileError(f"{path}: prototypes of shape {tuple(protos.shape)} do not match "
                                 f"{len(names)} classes x embed_dim {payload['embed_dim']}")
    if not torch.isfinite(protos).all():
        bad = sorted({names[i] for i in (~torch.isfinite(protos)).any(1).nonzero().flatten().tolist()})
        raise PrototypeFileError(f"{path}: prototypes of {bad} hold NaN or inf values; rebuild the file with "
                                 "tools/register_support.py")
    keys = ("shots", "seed", "support", "weights_sha256", "config", "created")
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


def sample_support(dataset_dicts: list[dict], num_classes: int, shots: int, seed: int) -> list[tuple[dict, int]]:
    """K annotated instances per class, seeded: ``[(dataset_dict, annotation_index), ...]``.

    K counts instances (boxes), not images. Candidates are sorted by (image_key or image_id, box
    index) before a seeded draw without replacement, so the result depends only on the data and the
    seed. An image with several boxes of a class may contribute several of them; its other boxes are
    not used. Classes with fewer than K instances use all they have.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    rng = np.random.default_rng(seed)
    key = lambda d: str(d.get("image_key", d["image_id"]))  # noqa: E731
    ordered = sorted(dataset_dicts, key=key)
    picks = []
    for c in range(num_classes):
        cands = [(d, i) for d in ordered for i, a in enumerate(d.get("annotations", []))
                 if a["category_id"] == c and not a.get("iscrowd", 0)]
        if not cands:
            raise ValueError(f"class {c} has no annotated instance to use as support")
        chosen = rng.choice(len(cands), size=min(shots, len(cands)), replace=False)
        picks += [cands[j] for j in sorted(chosen)]
    return picks


@torch.no_grad()
def embed_boxes(model, mapped: dict, boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Embed ground-truth boxes (in the mapped image's coordinates) with a prototype-head model."""
    heads = model.roi_heads
    images = model.preprocess_image([mapped])
    features = model.backbone(images.tensor)
    feats = [features[f] for f in heads.box_in_features]
    pooled = heads.box_pooler(feats, [Boxes(boxes_xyxy.to(images.tensor.device))])
    return heads.box_predictor.embed_features(heads.box_head(pooled))


def embed_instances(model, picks: list[tuple[dict, int]], mapper, progress: bool = False) -> torch.Tensor:
    """Embeddings (N, D) of the annotated boxes ``[(dataset_dict, annotation_index), ...]``.

    ``mapper`` is the evaluation mapper (test-time harmonization); boxes are scaled into its output size.
    Each image goes through the backbone once, however many of its boxes are listed.
    """
    by_image: dict[int, list[int]] = {}
    for n, (d, _) in enumerate(picks):
        by_image.setdefault(id(d), []).append(n)
    groups = list(by_image.values())
    if progress:
        from tqdm import tqdm
        groups = tqdm(groups, desc="embedding boxes", unit="img")
    was_training = model.training
    model.eval()
    out = torch.zeros(len(picks), model.roi_heads.box_predictor.embed.out_features)
    for group in groups:
        d = picks[group[0]][0]
        mapped = mapper(dict(d))
        sy, sx = mapped["image"].shape[1] / d["height"], mapped["image"].shape[2] / d["width"]
        anns = [d["annotations"][picks[n][1]] for n in group]
        boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
                             dtype=torch.float32) * torch.tensor([sx, sy, sx, sy])
        out[group] = embed_boxes(model, mapped, boxes).cpu()
    model.train(was_training)
    return out


def build_prototypes(model, dataset_dicts: list[dict], class_names: list[str], mapper, shots: int, seed: int,
                     progress: bool = False) -> PrototypeSet:
    """Prototypes (class means of support embeddings) from K seeded support instances per class."""
    picks = sample_support(dataset_dicts, len(class_names), shots, seed)
    embeddings = embed_instances(model, picks, mapper, progress)
    labels = torch.tensor([d["annotations"][i]["category_id"] for d, i in picks])
    protos = torch.stack([embeddings[labels == c].mean(0) for c in range(len(class_names))])
    support = [{"class": class_names[d["annotations"][i]["category_id"]], "image_key": str(d.get("image_key", d["image_id"])),
                "file_name": d["file_name"], "bbox": [float(v) for v in d["annotations"][i]["bbox"]]} for d, i in picks]
    return PrototypeSet(list(class_names), protos, shots, seed, support,
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
