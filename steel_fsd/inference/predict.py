"""Inspection-time prediction: a trained model (with or without a prototype file) on image files of any size.

:class:`Predictor` applies the training harmonization (CLAHE, resize) to each image, tiles strips (e.g.
Severstal's 1600x256) into overlapping squares as in training, runs the model on batches of tiles, maps the
boxes back to the original pixels and merges detections of one defect split by a tile border
(:func:`merge_tile_detections`). :func:`image_decision` turns an image's detections into pass/fail.

Speed options of :class:`Predictor` (results identical, or equal within mixed precision's rounding): ``amp``
runs the model under autocast (bfloat16 / float16, float32 outputs), ``channels_last`` stores the convolution
weights NHWC (faster convolutions on GPUs with tensor cores), ``prefetch`` harmonizes (and reads, in
:func:`predict_paths`) the next batches in worker threads while the model runs the current one, pinning the
tensors for an asynchronous copy when the model is on a GPU.
"""
from __future__ import annotations

import glob
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

from ..data.severstal import tile_positions
from ..data.transforms import build_harmonization
from ..modeling.checkpoint import checkpoint_classes, checkpoint_train_tile, read_weights_file
from ..engine.loading import load_model_for_eval
from ..fewshot.prototypes import PrototypeFileError, PrototypeSet, check_prototypes, load_prototypes
from ..utils.amp import amp_dtype, autocast, to_float32
from ..utils.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "find_images", "tile_windows", "merge_tile_detections", "tile_merge_groups", "Predictor",
           "image_decision", "prefetched", "predict_paths", "top_scores"]

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_TILE = 32  # "auto" tiling: the smallest tile side (a thinner strip would become hundreds of slivers)


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
    the union box and the highest score. Returns ``(boxes, scores, classes)``; :func:`tile_merge_groups` also
    names the input detections each kept one absorbed (to merge their masks).
    """
    if len(boxes) == 0:
        return boxes, scores, classes
    return apply_merge_groups(tile_merge_groups(boxes, scores, classes, tiles, nms_thresh, merge_thresh),
                              boxes, scores, classes)


def apply_merge_groups(groups: list[list[int]], boxes: torch.Tensor, scores: torch.Tensor,
                       classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per group of :func:`tile_merge_groups`: the union box, and the score and class of its first member."""
    merged = torch.stack([torch.cat([boxes[g, :2].min(0).values, boxes[g, 2:].max(0).values]) for g in groups])
    first = torch.tensor([g[0] for g in groups])
    return merged, scores[first], classes[first]


def tile_merge_groups(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, tiles: torch.Tensor,
                      nms_thresh: float = 0.5, merge_thresh: float = 0.5) -> list[list[int]]:
    """The merge of :func:`merge_tile_detections` as index lists into the inputs, one per kept detection in
    decreasing score: its own index first, then those it absorbed (NMS-suppressed detections are in none)."""
    if len(boxes) == 0:
        return []
    keep = batched_nms(boxes, scores, classes, nms_thresh)
    boxes, classes, tiles = boxes[keep].clone(), classes[keep], tiles[keep]
    alive = torch.ones(len(boxes), dtype=torch.bool)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    groups = []
    for i in range(len(boxes)):  # keep is sorted by decreasing score
        if not alive[i]:
            continue
        group = [i]
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
            both = torch.cat([boxes[i:i + 1], boxes[idx]])
            boxes[i] = torch.cat([both[:, :2].min(0).values, both[:, 2:].max(0).values])
            area[i] = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            alive[idx] = False
            members[tiles[idx]] = True
            group += idx.tolist()
        groups.append([int(keep[j]) for j in group])
    return groups


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

    ``batch_size`` images (tiles) go through the model at once. ``amp``: None (float32), ``"bfloat16"`` or
    ``"float16"`` (autocast; see :func:`~steel_fsd.utils.amp.amp_dtype`). ``channels_last``: convolution
    weights in NHWC. ``prefetch``: worker threads that harmonize the next ``prefetch`` batches during the
    current forward pass (0: in line). None of these changes which boxes are found, only how fast.
    """

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, class_names: list[str], tile: int | str = "auto",
                 overlap: int = 32, max_tile: int = 256, batch_size: int = 8, amp: str | None = None,
                 channels_last: bool = False, prefetch: int = 0):
        if batch_size < 1 or prefetch < 0:
            raise ValueError(f"batch_size must be >= 1 and prefetch >= 0, got {batch_size} and {prefetch}")
        self.cfg, self.model, self.class_names = cfg, model.eval(), list(class_names)
        self.tile, self.overlap, self.max_tile, self.batch_size = tile, overlap, max_tile, batch_size
        self.augmentations = T.AugmentationList(build_harmonization(cfg))
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.max_dets = cfg.TEST.DETECTIONS_PER_IMAGE
        self.nms_thresh = cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST
        self.amp, self.amp_dtype = amp, (amp_dtype(amp, self.device) if amp else None)
        self.channels_last, self.prefetch = channels_last, prefetch
        if channels_last:
            self.model.to(memory_format=torch.channels_last)  # 4-d weights only; others unchanged
        self._pin = prefetch > 0 and self.device.type == "cuda"

    @classmethod
    def from_files(cls, cfg: CfgNode, weights: str, prototypes: str | None = None, **kwargs) -> "Predictor":
        """Load ``weights`` (and the prototype file, checked against the model before any image is read).

        With ``tile="auto"`` (the default), a model whose checkpoint says it was trained on whole images is never
        tiled: only a model trained on tiles (Severstal's strips) gets its strips cut into squares."""
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
        payload = read_weights_file(weights)
        if kwargs.get("tile", "auto") == "auto" and checkpoint_train_tile(payload) == 0:
            logger.info("%s was trained on whole images: images are not tiled (--tile N to tile anyway)", weights)
            kwargs["tile"] = 0
        model = load_model_for_eval(cfg, check_classes=False, payload=payload)
        if ps is not None:
            model.roi_heads.box_predictor.set_support(ps.prototypes, ps.class_names)
            names = ps.class_names
        else:
            names = checkpoint_classes(payload) or [
                f"class_{i}" for i in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)]
        return cls(cfg, model, names, **kwargs)

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        if self.tile == "auto":
            short, long = sorted((height, width))
            # strips into squares of their short side; one under MIN_TILE px high is resized whole instead
            size = min(short, self.max_tile) if long >= 2 * short and short >= MIN_TILE else 0
        else:
            size = int(self.tile)
        # a thin strip (e.g. 1600x30) gets tiles of its short side: the overlap shrinks with them
        return tile_windows(height, width, size, min(self.overlap, max(size // 2, 0)))

    def harmonize(self, image: np.ndarray) -> torch.Tensor:
        """HxWxC image -> the model's CHW uint8 input after the training harmonization (CLAHE, resize)."""
        aug = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug)
        img = aug.image if aug.image.ndim == 3 else aug.image[:, :, None]
        return torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))

    def _inputs(self, image: np.ndarray, window) -> dict:
        x0, y0, x1, y1 = window
        tensor = self.harmonize(image[y0:y1, x0:x1])
        return {"image": tensor.pin_memory() if self._pin else tensor, "height": y1 - y0, "width": x1 - x0}

    def _forward(self, inputs: list[dict]) -> list[dict]:
        if self._pin:  # the copy overlaps with the previous batch's work; the model's own .to() is then a no-op
            inputs = [dict(x, image=x["image"].to(self.device, non_blocking=True)) for x in inputs]
        with autocast(self.device, self.amp_dtype):
            outputs = self.model(inputs)
        return to_float32(outputs) if self.amp_dtype is not None else outputs

    def _chunks(self, images: list[np.ndarray]) -> list[list[tuple[int, int, tuple]]]:
        """(image index, tile index, window) jobs in batches of ``batch_size``."""
        jobs = [(i, t, w) for i, img in enumerate(images) for t, w in enumerate(self.windows(*img.shape[:2]))]
        return [jobs[s:s + self.batch_size] for s in range(0, len(jobs), self.batch_size)]

    def _prepare_chunk(self, images, chunk) -> tuple[list, list[dict]]:
        return chunk, [self._inputs(images[i], w) for i, _, w in chunk]

    def prepare(self, images: list[np.ndarray]) -> list[tuple[list, list[dict]]]:
        """The model inputs of ``images``, batched (CPU work: harmonization, tiling); :meth:`run` consumes them."""
        return [self._prepare_chunk(images, c) for c in self._chunks(images)]

    @torch.no_grad()
    def run(self, images: list[np.ndarray], prepared) -> list[Instances]:
        """Detections of ``images`` from their :meth:`prepare`-d inputs (any iterable of its items, in order)."""
        found: list[list[tuple[int, tuple, Instances]]] = [[] for _ in images]
        for chunk, inputs in prepared:
            for (i, t, w), out in zip(chunk, self._forward(inputs)):
                found[i].append((t, w, out["instances"].to("cpu")))
        return [self._merge(img.shape[:2], parts) for img, parts in zip(images, found)]

    def __call__(self, images: list[np.ndarray]) -> list[Instances]:
        chunks = self._chunks(images)
        if self.prefetch and len(chunks) > 1:  # harmonize the next batches while the model runs this one
            return self.run(images, prefetched(lambda c: self._prepare_chunk(images, c), chunks, self.prefetch))
        return self.run(images, (self._prepare_chunk(images, c) for c in chunks))

    def _merge(self, shape, parts) -> Instances:
        """One image's tile detections in image pixels; with a mask model, each detection's mask is pasted into
        the full image (HxW bool) and a defect merged across tiles gets the union of its pieces' masks."""
        boxes, scores, classes, tiles, masks = [], [], [], [], []
        with_masks = all(inst.has("pred_masks") for _, _, inst in parts)
        for t, (x0, y0, x1, y1), inst in parts:
            boxes.append(inst.pred_boxes.tensor + torch.tensor([x0, y0, x0, y0], dtype=torch.float32))
            scores.append(inst.scores)
            classes.append(inst.pred_classes)
            tiles.append(torch.full((len(inst),), t, dtype=torch.long))
            if with_masks:
                full = torch.zeros((len(inst), *shape), dtype=torch.bool)
                full[:, y0:y1, x0:x1] = inst.pred_masks.bool()
                masks.append(full)
        b, s, c, t = (torch.cat(x) for x in (boxes, scores, classes, tiles))
        m = torch.cat(masks) if with_masks else None
        if len(parts) > 1 and len(b):
            groups = tile_merge_groups(b, s, c, t, self.nms_thresh)
            b, s, c = apply_merge_groups(groups, b, s, c)
            if m is not None:
                m = torch.stack([m[g].any(0) for g in groups])
        order = s.argsort(descending=True)[: self.max_dets]
        out = Instances(tuple(shape), pred_boxes=Boxes(b[order]), scores=s[order], pred_classes=c[order])
        if m is not None:
            out.pred_masks = m[order]
        return out


def prefetched(fn, items: list, ahead: int):
    """``fn(item)`` for each item, in order, computed by ``ahead`` worker threads up to ``ahead`` items ahead of
    the consumer (NumPy, OpenCV and tensor copies release the GIL, so this overlaps with a forward pass). An
    exception in ``fn`` is raised when its item is reached."""
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="steel_fsd_prefetch") as pool:
        pending = [pool.submit(fn, item) for item in items[:ahead]]
        for k in range(len(items)):
            if k + ahead < len(items):
                pending.append(pool.submit(fn, items[k + ahead]))
            yield pending[k].result()
            pending[k] = None  # release the batch


def predict_paths(predictor: Predictor, paths: list[str], prefix: str = "[predict]", progress: bool = True):
    """Read and predict ``paths`` in batches of ``predictor.batch_size``, yielding ``(index, path, image,
    instances, error)`` for every path in order: an unreadable image yields ``image`` and ``instances`` None and
    its :class:`~steel_fsd.data.errors.DatasetError` (also named on stderr). Progress, images/s and ETA go to
    stderr after each batch."""
    import sys
    import time

    from ..data.errors import DatasetError
    from ..data.images import read_image

    def read_batch(first: int):
        """The batch's (index, path, image, error) rows and its prepared model inputs (in a worker thread
        with ``prefetch``, overlapping with the previous batch's forward pass)."""
        batch = []
        for index, path in enumerate(paths[first:first + step], first):
            try:
                batch.append((index, path, read_image(path, predictor.cfg.INPUT.FORMAT), None))
            except DatasetError as e:
                batch.append((index, path, None, e))
        return batch, predictor.prepare([img for _, _, img, _ in batch if img is not None])

    start, predicted = time.perf_counter(), 0
    step = max(1, predictor.batch_size)
    starts = list(range(0, len(paths), step))
    batches = prefetched(read_batch, starts, predictor.prefetch) if predictor.prefetch else map(read_batch, starts)
    for first, (batch, prepared) in zip(starts, batches):
        for _, _, img, error in batch:
            if error is not None:
                print(f"{prefix} skipped: {error}", file=sys.stderr, flush=True)
        outputs = iter(predictor.run([img for _, _, img, _ in batch if img is not None], prepared))
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
