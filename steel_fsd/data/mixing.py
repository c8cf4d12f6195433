"""Augmentations that mix several training images: mosaic and copy-paste (train time only).

Both act on mapped images (the ``image`` tensor and ``instances`` the dataset mapper returns, after each image's
own harmonization and augmentation), so they need other images of the training set: :class:`MixingMapper` wraps
the dataset mapper and maps the extra images it draws with it.

* **Mosaic** (``INPUT.AUG.MOSAIC_PROB``): four images on a 2x2 canvas, each at the first image's size, then a
  window of that size around a random centre in the canvas's middle half. Defects keep their scale. A box cut
  by the window is kept when at least ``INPUT.AUG.MOSAIC_MIN_VISIBLE`` of its area is inside (it is clipped to
  the window), and dropped otherwise: a sliver of a defect is not labelled as the defect.
* **Copy-paste** (``INPUT.AUG.COPY_PASTE_PROB``, up to ``INPUT.AUG.COPY_PASTE_MAX`` defects): defects of another
  training image are cut out and pasted at random places of this one where they cover no defect already there
  (10 tries each; a defect that finds no free place is not pasted). A defect with a mask is pasted by its mask's
  pixels; a box-only defect (NEU-DET) by its whole box.

Instance masks go along when they are bitmasks (``INPUT.MASK_FORMAT bitmask``); polygon masks are refused. In
mixed data (box-only images beside images with masks), a mosaic holding a box-only image is box-only, and no
defect is pasted between a box-only image and one with masks.
Randomness comes from NumPy's global generator, which Detectron2 seeds per data-loader worker.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.structures.boxes import pairwise_intersection

__all__ = ["MixingMapper", "mosaic", "copy_paste", "mixing_enabled"]

_PASTE_TRIES = 10


def mixing_enabled(cfg) -> bool:
    aug = cfg.INPUT.AUG
    return bool(aug.ENABLED and (aug.MOSAIC_PROB > 0 or aug.COPY_PASTE_PROB > 0))


def _masks(inst: Instances) -> torch.Tensor | None:
    if not inst.has("gt_masks"):
        return None
    if not isinstance(inst.gt_masks, BitMasks):
        raise ValueError("mosaic and copy-paste move masks as bitmasks: set INPUT.MASK_FORMAT bitmask")
    return inst.gt_masks.tensor


def _resized(item: dict, h: int, w: int) -> tuple[torch.Tensor, Instances]:
    """The item's image and instances at (h, w) (bilinear image, nearest masks, scaled boxes)."""
    img, inst = item["image"], item["instances"]
    ih, iw = img.shape[1:]
    if (ih, iw) == (h, w):
        return img, inst
    img = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    out = Instances((h, w), gt_boxes=Boxes(inst.gt_boxes.tensor * torch.tensor([w / iw, h / ih, w / iw, h / ih])),
                    gt_classes=inst.gt_classes)
    m = _masks(inst)
    if m is not None:
        out.gt_masks = BitMasks(F.interpolate(m[None].float(), size=(h, w), mode="nearest")[0] > 0.5)
    return img.round().clamp(0, 255).to(item["image"].dtype), out


def mosaic(items: list[dict], center: tuple[float, float], min_visible: float = 0.3) -> dict:
    """Four mapped items -> one at the first item's size: the 2x2 canvas (items in reading order), cut to the
    window centred at ``center`` = (x, y) in canvas pixels. Boxes follow; see the module docstring for the
    visibility rule. The first item's other keys (file name, sizes) are kept."""
    if len(items) != 4:
        raise ValueError(f"mosaic needs 4 images, got {len(items)}")
    c, h, w = items[0]["image"].shape
    canvas = torch.zeros((c, 2 * h, 2 * w), dtype=items[0]["image"].dtype)
    # masks go along only when every image has them (a box-only image among them: a box-only mosaic)
    with_masks = all(_masks(it["instances"]) is not None for it in items)
    boxes, classes, masks = [], [], []
    for k, item in enumerate(items):
        img, inst = _resized(item, h, w)
        oy, ox = (k // 2) * h, (k % 2) * w
        canvas[:, oy:oy + h, ox:ox + w] = img
        boxes.append(inst.gt_boxes.tensor + torch.tensor([ox, oy, ox, oy], dtype=torch.float32))
        classes.append(inst.gt_classes)
        if with_masks:
            m = torch.zeros((len(inst), 2 * h, 2 * w), dtype=torch.bool)
            m[:, oy:oy + h, ox:ox + w] = _masks(inst)
            masks.append(m)
    x0, y0 = int(round(center[0] - w / 2)), int(round(center[1] - h / 2))
    x0, y0 = min(max(x0, 0), w), min(max(y0, 0), h)
    b = torch.cat(boxes) - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    clipped = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (cw * ch >= min_visible * area) & (cw >= 1) & (ch >= 1)
    out = Instances((h, w), gt_boxes=Boxes(clipped[keep]), gt_classes=torch.cat(classes)[keep])
    if with_masks:
        out.gt_masks = BitMasks(torch.cat(masks)[keep][:, y0:y0 + h, x0:x0 + w])
    return dict(items[0], image=canvas[:, y0:y0 + h, x0:x0 + w].contiguous(), instances=out)


def copy_paste(target: dict, donor: dict, max_objects: int, rng: np.random.Generator) -> dict:
    """Paste up to ``max_objects`` of ``donor``'s defects (chosen at random) into ``target`` at random free
    places (see the module docstring); returns the new item. Both are mapped items of the same channel count."""
    img, inst = target["image"].clone(), target["instances"]
    h, w = img.shape[1:]
    dimg, dinst = donor["image"], donor["instances"]
    boxes, classes = inst.gt_boxes.tensor.clone(), inst.gt_classes.clone()
    tmasks, dmasks = _masks(inst), _masks(dinst)
    if (tmasks is None) != (dmasks is None):  # a box-only image and a mask image (mixed data): nothing pasted
        return target
    new_masks = [tmasks] if tmasks is not None else []
    order = rng.permutation(len(dinst))[:max_objects] if len(dinst) else []
    for i in order:
        x0, y0, x1, y1 = (int(v) for v in dinst.gt_boxes.tensor[i].round().tolist())
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, dimg.shape[2]), min(y1, dimg.shape[1])
        bw, bh = x1 - x0, y1 - y0
        if bw < 1 or bh < 1 or bw > w or bh > h:
            continue
        for _ in range(_PASTE_TRIES):
            tx, ty = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            new = torch.tensor([tx, ty, tx + bw, ty + bh], dtype=torch.float32)
            if not (pairwise_intersection(Boxes(new[None]), Boxes(boxes)) > 0).any():
                break
        else:
            continue
        patch = dimg[:, y0:y1, x0:x1]
        if dmasks is not None:
            m = dmasks[i, y0:y1, x0:x1]
            img[:, ty:ty + bh, tx:tx + bw] = torch.where(m, patch, img[:, ty:ty + bh, tx:tx + bw])
            full = torch.zeros((1, h, w), dtype=torch.bool)
            full[0, ty:ty + bh, tx:tx + bw] = m
            new_masks.append(full)
        else:
            img[:, ty:ty + bh, tx:tx + bw] = patch
        boxes = torch.cat([boxes, new[None]])
        classes = torch.cat([classes, dinst.gt_classes[i:i + 1]])
    out = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=classes)
    if tmasks is not None:
        out.gt_masks = BitMasks(torch.cat(new_masks))
    return dict(target, image=img, instances=out)


class MixingMapper:
    """The dataset mapper, then mosaic and copy-paste with other images of ``dataset_dicts`` (mapped by the same
    mapper), each with its probability from ``cfg.INPUT.AUG``."""

    def __init__(self, cfg, mapper, dataset_dicts: list[dict]):
        aug = cfg.INPUT.AUG
        for key in ("MOSAIC_PROB", "COPY_PASTE_PROB", "MOSAIC_MIN_VISIBLE"):
            if not 0.0 <= getattr(aug, key) <= 1.0:
                raise ValueError(f"INPUT.AUG.{key} must be in [0, 1], got {getattr(aug, key)}")
        if aug.COPY_PASTE_MAX < 1:
            raise ValueError(f"INPUT.AUG.COPY_PASTE_MAX must be at least 1, got {aug.COPY_PASTE_MAX}")
        self.mapper, self.dicts = mapper, dataset_dicts
        self.mosaic_prob, self.paste_prob = float(aug.MOSAIC_PROB), float(aug.COPY_PASTE_PROB)
        self.paste_max, self.min_visible = int(aug.COPY_PASTE_MAX), float(aug.MOSAIC_MIN_VISIBLE)

    def _other(self) -> dict:
        return self.mapper(self.dicts[int(np.random.randint(len(self.dicts)))])

    def __call__(self, dataset_dict: dict) -> dict:
        out = self.mapper(dataset_dict)
        if "instances" not in out:
            return out
        if self.mosaic_prob and np.random.random() < self.mosaic_prob:
            h, w = out["image"].shape[1:]
            center = (np.random.uniform(0.5 * w, 1.5 * w), np.random.uniform(0.5 * h, 1.5 * h))
            out = mosaic([out] + [self._other() for _ in range(3)], center, self.min_visible)
        if self.paste_prob and np.random.random() < self.paste_prob:
            out = copy_paste(out, self._other(), self.paste_max, np.random.default_rng(np.random.randint(2**31)))
        return out
