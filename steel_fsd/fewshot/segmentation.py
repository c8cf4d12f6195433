"""Few-shot segmentation of unseen defect classes: episodic training on base classes and fold evaluation.

:func:`load_examples` harmonizes every image once (CLAHE, resize to the config's size, per-image
standardization) with its per-class masks. :func:`train_episodes` trains a
:class:`~steel_fsd.modeling.fewshot_seg.FewShotSegmenter` on episodes of the base classes (K support images and
one query of a class, random flips). :func:`evaluate_fold` segments each query image of the novel class from K
support images drawn, per query and seed, from the training split's images of that class, with four methods:

* ``response``: the trained decoder on response-weighted prototypes (the model as trained);
* ``average``: the same decoder on plain masked-average prototypes (no response weighting);
* ``panet``: PANet-style non-parametric prediction (scaled cosine similarity to the masked-average prototypes);
* ``finetune``: a 1x1 segmentation head on the same (frozen) backbone's ``p2`` features, fine-tuned on the K
  support masks (the "fine-tuned head" baseline).
"""
from __future__ import annotations

import inspect
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T

from ..data.images import read_dataset_image
from ..data.segmentation import class_masks, sample_supports
from ..data.transforms import build_harmonization
from ..evaluation.segmentation import SegmentationScores
from ..modeling.checkpoint import read_weights_file
from ..modeling.fewshot_seg import FewShotSegmenter, distill_loss

__all__ = ["METHODS", "THRESHOLDS", "load_examples", "train_episodes", "evaluate_fold", "finetune_head", "segment",
           "save_segmenter", "load_segmenter", "harmonize"]

logger = logging.getLogger(__name__)
METHODS = ("response", "average", "panet", "finetune")


def standardize(image: np.ndarray) -> torch.Tensor:
    """HxWxC uint8 -> CxHxW float, zero mean and unit variance per image (lines differ in exposure)."""
    x = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
    return (x - x.mean()) / (x.std() + 1e-6)


def harmonize(cfg, image: np.ndarray, masks: dict[int, np.ndarray] | None = None) -> tuple[torch.Tensor, dict]:
    """The training harmonization (CLAHE, resize) of an image and its masks (nearest), standardized."""
    augs = T.AugmentationList(build_harmonization(cfg))
    aug = T.AugInput(np.ascontiguousarray(image))
    tfm = augs(aug)
    out = {c: torch.as_tensor(tfm.apply_segmentation(m.astype(np.uint8)) > 0) for c, m in (masks or {}).items()}
    img = aug.image if aug.image.ndim == 3 else aug.image[:, :, None]
    return standardize(img), out


def load_examples(cfg, dicts: list[dict]) -> list[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
    """(image tensor, {class: mask}) of every dict, harmonized once."""
    return [harmonize(cfg, read_dataset_image(r, cfg.INPUT.FORMAT), class_masks(r)) for r in dicts]


def _flip(x: torch.Tensor, h: bool, v: bool) -> torch.Tensor:
    dims = [d for d, on in ((-1, h), (-2, v)) if on]
    return x.flip(dims) if dims else x


def _episode_draw(base: dict[int, list[int]], shots: int, rng: np.random.Generator):
    """(class, support indices + query index, their (h, v) flips) of one episode of a base class."""
    c = int(rng.choice(sorted(base)))
    q = int(rng.choice(base[c]))
    sup = sample_supports(base[c], shots, rng, exclude=q)
    flips = rng.random((shots + 1, 2)) < 0.5
    return c, sup + [q], [tuple(bool(v) for v in f) for f in flips]


def _episode(examples, base: dict[int, list[int]], shots: int, rng: np.random.Generator):
    c, idx, flips = _episode_draw(base, shots, rng)
    imgs = [_flip(examples[i][0], *f) for i, f in zip(idx, flips)]
    masks = [_flip(examples[i][1][c].float(), *f) for i, f in zip(idx, flips)]
    return torch.stack(imgs[:-1]), torch.stack(masks[:-1]), imgs[-1], masks[-1], torch.tensor(c)


def _flipped_features(model: FewShotSegmenter, examples) -> list[dict]:
    """Per example, ``{(h, v): {level: features}}`` of its four flips, from the (frozen) backbone."""
    out = []
    with torch.no_grad():
        for img, _ in examples:
            variants = [(h, v) for h in (False, True) for v in (False, True)]
            feats = model.features(torch.stack([_flip(img, h, v) for h, v in variants]))
            out.append({f: {lv: feats[lv][k] for lv in model.levels} for k, f in enumerate(variants)})
    return out


def seg_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice of the defect channel (defects cover a few percent of an image)."""
    ce = F.cross_entropy(logits, truth.long())
    p = logits.softmax(1)[:, 1]
    dice = 1 - (2 * (p * truth).sum((1, 2)) + 1) / (p.sum((1, 2)) + truth.sum((1, 2)) + 1)
    return ce + dice.mean()


def train_episodes(model: FewShotSegmenter, examples, base: dict[int, list[int]], steps: int, batch: int = 4,
                   shots: int = 1, lr: float = 1e-3, seed: int = 0, log_every: int = 50,
                   distill: float = 0.0, freeze_backbone: bool = False) -> list[float]:
    """AdamW on ``steps`` batches of ``batch`` episodes of the base classes; returns the loss per step.
    ``distill``: weight of the attention distillation loss (:func:`distill_loss`; 0 = off). A model with a
    memory remembers each episode's prototypes. ``freeze_backbone``: the backbone is not trained; its features
    of every example and its four flips are computed once, and each step trains the rest on them (many more
    steps for the same time). Progress, the smoothed loss and an ETA are logged every ``log_every`` steps."""
    if not base:
        raise ValueError("no base class with images to train on")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cache = None
    if freeze_backbone:
        model.backbone.requires_grad_(False)
        model.backbone.eval()
        t0 = time.perf_counter()
        cache = _flipped_features(model, examples)
        logger.info("[fewshot-seg] frozen backbone: features of %d examples x 4 flips in %.0f s", len(examples),
                    time.perf_counter() - t0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    if freeze_backbone:
        model.backbone.eval()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        aux: dict = {}
        if cache is None:
            eps = [_episode(examples, base, shots, rng) for _ in range(batch)]
            s, sm, q, qm, classes = (torch.stack(x) for x in zip(*eps))
            logits = model(s, sm, q, classes=classes, aux=aux)
        else:
            draws = [_episode_draw(base, shots, rng) for _ in range(batch)]
            classes = torch.tensor([c for c, _, _ in draws])
            sf = {lv: torch.stack([cache[i][f][lv] for _, idx, fl in draws for i, f in zip(idx[:-1], fl[:-1])])
                  for lv in model.levels}
            qf = {lv: torch.stack([cache[idx[-1]][fl[-1]][lv] for _, idx, fl in draws]) for lv in model.levels}
            sm = torch.stack([_flip(examples[i][1][c].float(), *f) for c, idx, fl in draws
                              for i, f in zip(idx[:-1], fl[:-1])])
            qm = torch.stack([_flip(examples[idx[-1]][1][c].float(), *fl[-1]) for c, idx, fl in draws])
            logits = model.logits(sf, sm, shots, qf, qm.shape[-2:], classes=classes, aux=aux)
        loss = seg_loss(logits, qm)
        if distill:
            loss = loss + distill * distill_loss(aux["fg_maps"], logits[:, 1] - logits[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        model.remember(aux["prototypes"], classes)
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            el = time.perf_counter() - start
            logger.info("[fewshot-seg] step %d/%d loss %.3f (last %d), %.2f s/step, ETA %.0f s", step + 1, steps,
                        float(np.mean(losses[-log_every:])), min(log_every, len(losses)), el / (step + 1),
                        el / (step + 1) * (steps - step - 1))
    model.eval()
    return losses


def finetune_head(model: FewShotSegmenter, support: torch.Tensor, masks: torch.Tensor, steps: int = 50,
                  lr: float = 0.01, feat: torch.Tensor | None = None) -> torch.nn.Module:
    """A 1x1 convolution on the frozen backbone's first level, trained on the K support masks (Adam);
    ``feat``: that level's support features if already computed."""
    if feat is None:
        with torch.no_grad():
            feat = model.features(support)[model.levels[0]]
    head = torch.nn.Conv2d(feat.shape[1], 2, 1)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        logits = model.to_input_size(head(feat), masks.shape[-2:])
        loss = seg_loss(logits, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


@torch.no_grad()
def segment(model: FewShotSegmenter, methods, support: torch.Tensor, masks: torch.Tensor,
            query: torch.Tensor) -> dict[str, torch.Tensor]:
    """(K, C, H, W) support, (K, H, W) masks, (N, C, H, W) queries -> ``{method: (N, H, W) defect
    probability}`` for each of ``methods`` (a name or a list), from one backbone pass per image."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    sf, qf = model.features(support), model.features(query)
    n, size, out = len(query), query.shape[-2:], {}
    for method in methods:
        if method == "finetune":
            with torch.enable_grad():
                head = finetune_head(model, support, masks.float(), feat=sf[model.levels[0]])
            logits = model.to_input_size(head(qf[model.levels[0]]), size)
        elif method in METHODS:
            rep = {lv: f.repeat(n, 1, 1, 1) for lv, f in sf.items()}  # the K supports for each query
            logits = model.logits(rep, masks.float().repeat(n, 1, 1), len(support), qf, size,
                                  decoder=method != "panet", pooling="response" if method == "response" else "average")
        else:
            raise ValueError(f"method {method!r}: one of {METHODS}")
        out[method] = logits.softmax(1)[:, 1]
    return out


THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # defect-probability thresholds scored (choose on val)


def evaluate_fold(model: FewShotSegmenter, train_examples, test_examples, novel: int, class_name: str,
                  shots: int, seeds: list[int], methods=METHODS, scores: dict | None = None,
                  thresholds=(0.5,)) -> dict:
    """Segment every test image holding class ``novel`` from ``shots`` support images of it drawn from the
    training examples (per query and seed); accumulate into ``scores[(method, seed, threshold)]`` (created if
    None) for each defect-probability threshold, and return it. Masks are compared in the harmonized (resized)
    frame. Progress and an ETA are logged after each seed."""
    scores = {} if scores is None else scores
    pool = [i for i, (_, m) in enumerate(train_examples) if novel in m]
    queries = [i for i, (_, m) in enumerate(test_examples) if novel in m]
    model.eval()
    start = time.perf_counter()
    for n_done, seed in enumerate(seeds, 1):
        rng = np.random.default_rng([seed, novel, shots])
        for q in queries:
            sup = sample_supports(pool, shots, rng)
            s = torch.stack([train_examples[i][0] for i in sup])
            sm = torch.stack([train_examples[i][1][novel] for i in sup])
            img, truth = test_examples[q][0][None], test_examples[q][1][novel].numpy()
            for method, prob in segment(model, methods, s, sm, img).items():
                for t in thresholds:
                    scores.setdefault((method, seed, t), SegmentationScores()).add(
                        class_name, (prob[0] >= t).numpy(), truth)
        el = time.perf_counter() - start
        logger.info("[fewshot-seg] %s, K=%d: seed %d/%d (%d queries), ETA %.0f s", class_name, shots, n_done,
                    len(seeds), len(queries), el / n_done * (len(seeds) - n_done))
    return scores


def save_segmenter(path: str, model: FewShotSegmenter, **meta) -> None:
    """Write the segmenter's weights with what rebuilds it (``model.arch``: levels, pooling, widths) and
    ``meta`` (e.g. the classes it was trained on), atomically."""
    from ..utils.io import atomic_open

    payload = {"segmenter": model.state_dict(), **model.arch, **meta}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_segmenter(cfg, path: str) -> tuple[FewShotSegmenter, dict]:
    """(model in eval mode, the file's metadata) from :func:`save_segmenter`'s file, built with ``cfg``'s
    backbone; a file that is not a segmenter file or does not fit the config raises ``ValueError`` naming it."""
    data = read_weights_file(path)  # WeightsReadError / UnsafeWeightsError (ValueErrors) name the file
    if "segmenter" not in data:
        raise ValueError(f"{path}: not a segmenter file (no 'segmenter' weights); write one with "
                         "tools/segment_fewshot.py --train-dataset")
    keys = inspect.signature(FewShotSegmenter).parameters
    arch = {k: data[k] for k in keys if k != "cfg" and k in data}  # files written before widths: levels, pooling
    model = FewShotSegmenter(cfg, **arch)
    try:
        model.load_state_dict(data["segmenter"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit {cfg.MODEL.BACKBONE.NAME} of this config "
                         f"({str(e).splitlines()[0]}); give the config it was trained with") from None
    return model.eval(), {k: v for k, v in data.items() if k != "segmenter"}
