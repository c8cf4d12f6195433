"""Checkpoint surgery: resize a detector's class-specific layers to a new class list (TFA-style fine-tuning).

Classes are matched by name: a target class also in the source list keeps its trained weights (moved
to its target index), a new class is initialised as Detectron2 initialises that layer (random parts
from a ``torch.Generator`` seeded by ``seed``), a source class not in the target is dropped. Heads,
found by state-dict key (report names in quotes):
  * "softmax": Faster R-CNN ``roi_heads.box_predictor.cls_score`` (C+1 rows, background last and kept);
  * "bbox_class_specific": ``roi_heads.box_predictor.bbox_pred`` with 4C rows (rows 4c..4c+3: class c),
    or "bbox_agnostic" with 4 rows, left unchanged (with one source class the two look alike: it is
    taken as agnostic);
  * "prototype_bank": steel_fsd's ``roi_heads.box_predictor.bank`` (C, D) and ``bank_filled`` (C,);
  * "retinanet": ``head.cls_score`` with A*C output channels, channel a*C + c for anchor a and class c
    (Detectron2's ``permute_to_N_HWA_K`` layout), no background; new classes get the prior-probability bias.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .checkpoint import META_KEY, atomic_save, checkpoint_classes, read_weights_file

SOFTMAX = "roi_heads.box_predictor.cls_score"
BBOX = "roi_heads.box_predictor.bbox_pred"
BANK = "roi_heads.box_predictor.bank"
RETINANET = "head.cls_score"
RETINANET_BBOX = "head.bbox_pred"


def _check_names(classes: list[str], what: str) -> None:
    if not classes:
        raise ValueError(f"{what} is empty")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ValueError(f"{what} has duplicate class names {dup}")


def _rows(state: dict, key: str, expected: int, n_src: int) -> torch.Tensor:
    """``state[key]``, which must have ``expected`` rows for ``n_src`` source classes."""
    if key not in state:
        raise ValueError(f"{key}: missing from the state")
    t = state[key]
    if t.shape[0] != expected:
        raise ValueError(f"{key}: {t.shape[0]} rows, expected {expected} for the {n_src} source classes")
    return t


def _layer(state: dict, prefix: str, expected: int, n_src: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prefix``'s weight and bias, each with ``expected`` rows."""
    return _rows(state, f"{prefix}.weight", expected, n_src), _rows(state, f"{prefix}.bias", expected, n_src)


def _remap(t: torch.Tensor, index: list[int | None], fill: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Class slices of ``t`` moved to the target classes.

    Dim 0 of ``t`` holds ``groups`` blocks of one equal slice per source class (block-major); ``fill``
    has the same layout for the target classes. Target slice j is source slice ``index[j]``, or
    ``fill``'s where ``index[j]`` is None.
    """
    rest, n = t.shape[1:], len(index)
    per = fill.shape[0] // (groups * n)
    src = t.reshape(groups, -1, per, *rest)
    out = fill.reshape(groups, n, per, *rest).clone()
    for j, i in enumerate(index):
        if i is not None:
            out[:, j] = src[:, i]
    return out.reshape(-1, *rest)


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(like.dtype)


def _prototype_rows(init: dict[str, torch.Tensor], target: list[str], index: list[int | None], dim: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank rows (L2-normalised) and ``bank_filled`` for the new classes that have an initial prototype."""
    unknown = sorted(set(init) - set(target))
    if unknown:
        raise ValueError(f"init_prototypes names classes {unknown} that are not target classes {target}")
    bank, filled = torch.zeros(len(target), dim), torch.zeros(len(target), dtype=torch.bool)
    for j, name in enumerate(target):
        if index[j] is None and name in init:
            v = torch.as_tensor(init[name]).float().flatten()
            if v.numel() != dim or not torch.isfinite(v).all() or not v.norm() > 0:
                raise ValueError(f"init_prototypes[{name!r}]: need a finite nonzero vector of dim {dim}, "
                                 f"got shape {tuple(torch.as_tensor(init[name]).shape)}")
            bank[j], filled[j] = F.normalize(v, dim=0), True
    return bank, filled


def resize_state_dict(state: dict[str, torch.Tensor], source_classes: list[str], target_classes: list[str],
                      seed: int = 0, init_prototypes: dict[str, torch.Tensor] | None = None,
                      prior_prob: float = 0.01) -> tuple[dict[str, torch.Tensor], dict]:
    """Resize the class-specific heads of a model ``state`` from ``source_classes`` to ``target_classes``.

    ``init_prototypes`` (class name -> (D,) vector) seeds the prototype-bank rows of new classes
    (normalised, marked filled); entries for kept classes are ignored (the trained row wins). New
    RetinaNet classes get the bias ``-log((1 - prior_prob) / prior_prob)``
    (``MODEL.RETINANET.PRIOR_PROB``). Returns the new state (the input is not modified) and a report
    ``{"copied", "new", "dropped", "heads", "prototypes_from_init"}``.
    """
    source, target = list(source_classes), list(target_classes)
    _check_names(source, "source_classes")
    _check_names(target, "target_classes")
    n_src = len(source)
    index = [source.index(c) if c in source else None for c in target]
    new_classes = [c for c, i in zip(target, index) if i is None]
    gen = torch.Generator().manual_seed(seed)
    out, heads, from_init = dict(state), [], []

    if f"{SOFTMAX}.weight" in state:
        heads.append("softmax")
        w, b = _layer(state, SOFTMAX, n_src + 1, n_src)
        fill = _normal((len(target), *w.shape[1:]), 0.01, gen, w)
        out[f"{SOFTMAX}.weight"] = torch.cat([_remap(w[:-1], index, fill), w[-1:]])
        out[f"{SOFTMAX}.bias"] = torch.cat([_remap(b[:-1], index, b.new_zeros(len(target))), b[-1:]])
    if f"{BBOX}.weight" in state and state[f"{BBOX}.weight"].shape[0] == 4:
        heads.append("bbox_agnostic")
    elif f"{BBOX}.weight" in state:
        heads.append("bbox_class_specific")
        w, b = _layer(state, BBOX, 4 * n_src, n_src)
        out[f"{BBOX}.weight"] = _remap(w, index, _normal((4 * len(target), *w.shape[1:]), 0.001, gen, w))
        out[f"{BBOX}.bias"] = _remap(b, index, b.new_zeros(4 * len(target)))
    if BANK in state:
        heads.append("prototype_bank")
        bank = _rows(state, BANK, n_src, n_src)
        filled = _rows(state, f"{BANK}_filled", n_src, n_src)
        init_bank, init_filled = _prototype_rows(init_prototypes or {}, target, index, bank.shape[1])
        out[BANK] = _remap(bank, index, init_bank.to(bank.dtype))
        out[f"{BANK}_filled"] = _remap(filled, index, init_filled)
        from_init = [c for c, f in zip(target, init_filled.tolist()) if f]
    elif init_prototypes:
        raise ValueError(f"init_prototypes given but the state has no prototype bank ({BANK})")
    if f"{RETINANET}.weight" in state:
        heads.append("retinanet")
        if f"{RETINANET_BBOX}.weight" not in state:
            raise ValueError(f"{RETINANET}.weight without {RETINANET_BBOX}.weight: cannot tell the anchor count")
        anchors = state[f"{RETINANET_BBOX}.weight"].shape[0] // 4
        w, b = _layer(state, RETINANET, anchors * n_src, n_src)
        n = anchors * len(target)
        out[f"{RETINANET}.weight"] = _remap(w, index, _normal((n, *w.shape[1:]), 0.01, gen, w), groups=anchors)
        prior = b.new_full((n,), -math.log((1 - prior_prob) / prior_prob))
        out[f"{RETINANET}.bias"] = _remap(b, index, prior, groups=anchors)
    if not set(heads) - {"bbox_agnostic"}:
        raise ValueError(f"no class-specific head found (looked for {SOFTMAX}, {BBOX}, {BANK}, {RETINANET})")
    report = {"copied": [c for c, i in zip(target, index) if i is not None], "new": new_classes,
              "dropped": [c for c in source if c not in target], "heads": heads,
              "prototypes_from_init": from_init}
    return out, report


def resize_checkpoint(src_path: str, dst_path: str, source_classes: list[str] | None, target_classes: list[str],
                      seed: int = 0, init_prototypes: dict[str, torch.Tensor] | None = None) -> dict:
    """Resize a checkpoint file (Detectron2's ``{"model": state, ...}`` or a bare state dict) with
    :func:`resize_state_dict` and write ``{"model": new_state}`` to ``dst_path`` atomically.

    The file is read with :func:`~steel_fsd.modeling.checkpoint.read_weights_file` (no code runs from it:
    anything but tensors, numpy arrays and plain data is refused). Optimizer, scheduler and iteration are
    dropped, so fine-tuning from ``dst_path`` starts at iteration 0; the target class names are stored
    with the weights. ``source_classes`` None: the names stored in the checkpoint; given, they must equal them
    (when stored). Returns the report, plus ``"discarded"``: the checkpoint's other top-level keys.
    """
    if os.path.exists(dst_path) and os.path.samefile(src_path, dst_path):
        raise ValueError(f"{dst_path}: destination is the source checkpoint; write to a new file")
    ckpt = read_weights_file(src_path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state, discarded = ckpt["model"], sorted(k for k in ckpt if k != "model")
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, discarded = ckpt, []
    else:
        raise ValueError(f"{src_path}: neither a Detectron2 checkpoint (no 'model' dict) nor a state dict")
    stored = checkpoint_classes(ckpt)
    if source_classes is None:
        if stored is None:
            raise ValueError(f"{src_path}: the checkpoint stores no class names; give the source classes")
        source_classes = stored
    elif stored is not None and stored != list(source_classes):  # rows would be relabelled silently
        raise ValueError(f"{src_path}: the checkpoint stores its classes {stored}, but the source classes given are "
                         f"{list(source_classes)}; give them in the checkpoint's order (or omit them to use the "
                         "checkpoint's)")
    try:
        new_state, report = resize_state_dict(state, list(source_classes), list(target_classes), seed,
                                              init_prototypes)
    except ValueError as e:
        raise ValueError(f"{src_path}: {e}") from None
    atomic_save({"model": new_state, META_KEY: {"thing_classes": list(target_classes)}}, dst_path)
    return {**report, "discarded": discarded}
