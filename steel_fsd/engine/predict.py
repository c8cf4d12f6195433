"""Inspection-time prediction: a trained model (with or without a prototype file) on image files of any size.

:class:`Predictor` applies the training harmonization (CLAHE, resize) to each image, tiles strips (e.g.
Severstal's 1600x256) into overlapping squares as in training, runs the model on batches of tiles, maps the
boxes back to the original pixels and merges detections of one defect split by a tile border
(:func:`merge_tile_detections`). :func:`image_decision` turns an image's detections into pass/fail.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

from ..data.severstal import tile_positions
from ..data.transforms import build_harmonization
from ..modeling.checkpoint import checkpoint_classes, read_weights_file
from ..modeling.prototypes import PrototypeFileError, PrototypeSet, load_prototypes
from ..modeling.support import check_prototypes
from ..utils.cli import UserError
from .trainer import load_model_for_eval

__all__ = ["IMAGE_EXTENSIONS", "find_images", "tile_windows", "merge_tile_detections", "Predictor",
           "image_decision", "predict_paths", "top_scores"]

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def find_images(inputs: list[str]) -> list[str]:
    """Image files named by ``inputs``: files (any extension), folders (recursively, files with an image
    extension) and glob patterns, in order, without duplicates. :class:`UserError` for a path that does not
    exist, a pattern that matches nothing, or no image at all."""
    found: list[str] = []
    for item in inputs:
        if os.path.isfile(item):
            found.append(item)
        elif os.path.isdir(item):
            found += sorted(os.path.join(root, f) for root, _, files in os.walk(item) for f in files
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"--input pattern {item!r} matches no file", "", "check the pattern")
            found += matches
        else:
            raise UserError(f"--input {item} does not exist", "", "give image files, folders or glob patterns")
    unique = list(dict.fromkeys(os.path.abspath(p) for p in found))
    if not unique:
        raise UserError(f"no image found in --input {' '.join(inputs)}", "",
                        f"folders are searched recursively for {', '.join(IMAGE_EXTENSIONS)} files")
    return unique


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` windows of at most ``tile`` pixels covering the image (``tile`` 0: the whole
    image), placed as the training tiles (:func:`~steel_fsd.data.severstal.tile_positions`)."""
    if tile <= 0 or (height <= tile and width <= tile):
        return [(0, 0, width, height)]
    th, tw = min(tile, height), min(tile, width)
    return [(x, y, x + tw, y + th) for y in tile_positions(height, tile, overlap)
            for x in tile_positions(width, tile, overlap)]


def merge_tile_detections(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, tiles: torch.Tensor,
                          nms_thresh: float = 0.5, merge_thresh: float = 0.5) -> tuple[torch.Tensor, ...]:
    """Detections of all tiles of one image (boxes in image pixels) -> one set.

    First class-wise NMS at ``nms_thresh`` (as within a tile). Then, greedily by score, a detection absorbs
    every detection of the same class from *another* tile whose intersection with it covers at least
    ``merge_thresh`` of the smaller box: a defect cut by a tile border is seen as a truncated box in one tile
    and a larger (or also truncated) box in the next, and their union is the defect. The kept detection takes
    the union box and the highest score. Returns ``(boxes, scores, classes)``.
    """
    if len(boxes) == 0:
        return boxes, scores, classes
    keep = batched_nms(boxes, scores, classes, nms_thresh)
    boxes, scores, classes, tiles = boxes[keep].clone(), scores[keep], classes[keep], tiles[keep]
    alive = torch.ones(len(boxes), dtype=torch.bool)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in range(len(boxes)):  # keep is sorted by decreasing score
        if not alive[i]:
            continue
        members = torch.zeros(int(tiles.max()) + 1, dtype=torch.bool)
        members[tiles[i]] = True
        while True:  # absorb, grow the box, and look again (a defect may span several tiles)
            cand = alive & (classes == classes[i]) & ~members[tiles]
            cand[: i + 1] = False
            if not cand.any():
                break
            a, b = boxes[i], boxes[cand]
            iw = (torch.min(a[2], b[:, 2]) - torch.max(a[0], b[:, 0])).clamp(min=0)
            ih = (torch.min(a[3], b[:, 3]) - torch.max(a[1], b[:, 1])).clamp(min=0)
            smaller = torch.min((a[2] - a[0]) * (a[3] - a[1]), area[cand]).clamp(min=1e-6)
            hit = iw * ih / smaller >= merge_thresh
            if not hit.any():
                break
            idx = cand.nonzero().flatten()[hit]
            group = torch.cat([boxes[i:i + 1], boxes[idx]])
            boxes[i] = torch.cat([group[:, :2].min(0).values, group[:, 2:].max(0).values])
            area[i] = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            alive[idx] = False
            members[tiles[idx]] = True
    return boxes[alive], scores[alive], classes[alive]


@dataclass
class Decision:
    defect: bool
    worst_class: str
    max_score: float


def image_decision(instances: Instances, class_names: list[str], threshold: float) -> Decision:
    """An image is rejected (defect) when one detection scores >= ``threshold``; worst = the top detection."""
    if len(instances) == 0:
        return Decision(False, "", 0.0)
    top = int(instances.scores.argmax())
    score = float(instances.scores[top])
    return Decision(score >= threshold, class_names[int(instances.pred_classes[top])], score)


class Predictor:
    """A model in eval mode plus the harmonization and tiling of its config.

    ``tile``: ``"auto"`` tiles an image whose long side is at least twice its short side into squares of the
    short side (at most ``max_tile`` pixels; Severstal strips become the 256-pixel training tiles), an int
    tiles into squares of that size (0: never). Calling it on a list of images (HxWxC uint8 in the config's
    INPUT.FORMAT) returns one :class:`Instances` per image, in image pixels, sorted by score.
    """

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, class_names: list[str], tile: int | str = "auto",
                 overlap: int = 32, max_tile: int = 256, batch_size: int = 8):
        self.cfg, self.model, self.class_names = cfg, model.eval(), list(class_names)
        self.tile, self.overlap, self.max_tile, self.batch_size = tile, overlap, max_tile, batch_size
        self.augmentations = T.AugmentationList(build_harmonization(cfg))
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.max_dets = cfg.TEST.DETECTIONS_PER_IMAGE
        self.nms_thresh = cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST

    @classmethod
    def from_files(cls, cfg: CfgNode, weights: str, prototypes: str | None = None, **kwargs) -> "Predictor":
        """Load ``weights`` (and the prototype file, checked against the model before any image is read)."""
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS, cfg.MODEL.PROTOTYPE.SUPPORT_FILE = weights, ""
        ps: PrototypeSet | None = None
        if prototypes:
            if cfg.MODEL.ROI_HEADS.NAME != "PrototypeROIHeads":
                raise PrototypeFileError(f"--prototypes {prototypes}: the config's ROI head {cfg.MODEL.ROI_HEADS.NAME} "
                                         "has no prototypes (use a prototype config)")
            ps = load_prototypes(prototypes)
            check_prototypes(ps, prototypes, cfg.MODEL.PROTOTYPE.EMBED_DIM, weights)
        cfg.freeze()
        model = load_model_for_eval(cfg, check_classes=False)
        if ps is not None:
            model.roi_heads.box_predictor.set_support(ps.prototypes, ps.class_names)
            names = ps.class_names
        else:
            names = checkpoint_classes(read_weights_file(weights)) or [
                f"class_{i}" for i in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)]
        return cls(cfg, model, names, **kwargs)

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        if self.tile == "auto":
            short, long = sorted((height, width))
            size = min(short, self.max_tile) if long >= 2 * short else 0
        else:
            size = int(self.tile)
        return tile_windows(height, width, size, self.overlap)

    def harmonize(self, image: np.ndarray) -> torch.Tensor:
        """HxWxC image -> the model's CHW uint8 input after the training harmonization (CLAHE, resize)."""
        aug = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug)
        img = aug.image if aug.image.ndim == 3 else aug.image[:, :, None]
        return torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))

    def _inputs(self, image: np.ndarray, window) -> dict:
        x0, y0, x1, y1 = window
        return {"image": self.harmonize(image[y0:y1, x0:x1]), "height": y1 - y0, "width": x1 - x0}

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[Instances]:
        jobs = [(i, t, w) for i, img in enumerate(images) for t, w in enumerate(self.windows(*img.shape[:2]))]
        found: list[list[tuple[int, tuple, Instances]]] = [[] for _ in images]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            outputs = self.model([self._inputs(images[i], w) for i, _, w in chunk])
            for (i, t, w), out in zip(chunk, outputs):
                found[i].append((t, w, out["instances"].to("cpu")))
        return [self._merge(img.shape[:2], parts) for img, parts in zip(images, found)]

    def _merge(self, shape, parts) -> Instances:
        boxes, scores, classes, tiles = [], [], [], []
        for t, (x0, y0, _, _), inst in parts:
            boxes.append(inst.pred_boxes.tensor + torch.tensor([x0, y0, x0, y0], dtype=torch.float32))
            scores.append(inst.scores)
            classes.append(inst.pred_classes)
            tiles.append(torch.full((len(inst),), t, dtype=torch.long))
        b, s, c, t = (torch.cat(x) for x in (boxes, scores, classes, tiles))
        if len(parts) > 1:
            b, s, c = merge_tile_detections(b, s, c, t, self.nms_thresh)
        order = s.argsort(descending=True)[: self.max_dets]
        return Instances(tuple(shape), pred_boxes=Boxes(b[order]), scores=s[order], pred_classes=c[order])


def predict_paths(predictor: Predictor, paths: list[str], prefix: str = "[predict]", progress: bool = True):
    """Read and predict ``paths`` in batches of ``predictor.batch_size``, yielding ``(index, path, image,
    instances, error)`` for every path in order: an unreadable image yields ``image`` and ``instances`` None and
    its :class:`~steel_fsd.data.errors.DatasetError` (also named on stderr). Progress, images/s and ETA go to
    stderr after each batch."""
    import sys
    import time

    from ..data.errors import DatasetError
    from ..data.images import read_image

    start, predicted = time.perf_counter(), 0
    step = max(1, predictor.batch_size)
    for first in range(0, len(paths), step):
        batch: list[tuple[int, str, np.ndarray | None, DatasetError | None]] = []
        for index, path in enumerate(paths[first:first + step], first):
            try:
                batch.append((index, path, read_image(path, predictor.cfg.INPUT.FORMAT), None))
            except DatasetError as e:
                print(f"{prefix} skipped: {e}", file=sys.stderr, flush=True)
                batch.append((index, path, None, e))
        outputs = iter(predictor([img for _, _, img, _ in batch if img is not None]))
        for index, path, img, error in batch:
            yield index, path, img, (next(outputs) if img is not None else None), error
            predicted += img is not None
        if progress:
            done, el = min(first + step, len(paths)), time.perf_counter() - start
            print(f"{prefix} {done}/{len(paths)} images, {predicted / max(el, 1e-9):.1f} images/s, "
                  f"ETA {el / done * (len(paths) - done):.0f} s", file=sys.stderr, flush=True)


def top_scores(predictor: Predictor, paths: list[str], progress: bool = True) -> tuple[list[float], list[str]]:
    """The top detection score of each readable image in ``paths`` (0 without detections), and the unreadable
    ones (skipped, named on stderr)."""
    scores, skipped = [], []
    for _, path, _, inst, error in predict_paths(predictor, paths, prefix=" ", progress=progress):
        if error is not None:
            skipped.append(path)
        else:
            scores.append(float(inst.scores.max()) if len(inst) else 0.0)
    return scores, skipped
