"""Episodic, class-balanced training batches: every batch is N classes x K images.

Batch-hard triplet mining needs positives and negatives in every batch; a plain sampler may draw a
batch of one class. Select with ``DATALOADER.SAMPLER_TRAIN EpisodicClassSampler``. Images holding only
objectness-only boxes (``objectness.py``) form one more pseudo-class, drawn like the others.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import MapDataset
from detectron2.utils import comm

from .objectness import OBJECTNESS_KEY

SAMPLER_NAME = "EpisodicClassSampler"


class EpisodicBatchSampler(torch.utils.data.Sampler):
    """Infinite batches of ``n_way`` distinct classes x ``k_images`` images holding that class.

    Classes are drawn uniformly (without replacement within a batch), then images containing the
    class, avoiding repeats inside the batch where possible. Seeded; deterministic.

    Distributed: like Detectron2's ``TrainingSampler``, every rank draws the same seeded stream of
    episodes and takes its own shard of it, episodes ``rank, rank + world_size, ...`` (``rank`` and
    ``world_size`` default to Detectron2's ``comm``): the ranks' episodes of one iteration are
    consecutive episodes of that stream, as one process would draw them in a row.
    """

    def __init__(self, dataset_dicts: list[dict], n_way: int, k_images: int, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        self.by_class: dict[int, list[int]] = {}
        for i, d in enumerate(dataset_dicts):
            for c in sorted({a["category_id"] for a in d.get("annotations", [])}):
                self.by_class.setdefault(c, []).append(i)
            if not d.get("annotations") and d.get(OBJECTNESS_KEY):
                self.by_class.setdefault(-1, []).append(i)
        self.classes = sorted(self.by_class)
        if n_way > len(self.classes):
            raise ValueError(f"episodes of {n_way} classes need {n_way} classes with annotations, "
                             f"the training data has {len(self.classes)}: set DATALOADER.EPISODE_CLASSES to at "
                             f"most {len(self.classes)} and DATALOADER.EPISODE_IMAGES_PER_CLASS so that their "
                             f"product is SOLVER.IMS_PER_BATCH (e.g. 2 x 2 for a batch of 4)")
        self.n_way, self.k_images, self.seed = n_way, k_images, seed
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size

    def _episodes(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed)
        while True:
            batch: list[int] = []
            for c in rng.choice(self.classes, size=self.n_way, replace=False):
                pool = [i for i in self.by_class[int(c)] if i not in batch] or self.by_class[int(c)]
                batch += [int(i) for i in rng.choice(pool, size=self.k_images, replace=len(pool) < self.k_images)]
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        yield from itertools.islice(self._episodes(), self.rank, None, self.world_size)


def build_episodic_train_loader(cfg: CfgNode, mapper, dicts: list[dict] | None = None) -> torch.utils.data.DataLoader:
    """A training loader whose every batch is one episode (see :class:`EpisodicBatchSampler`); ``dicts``: the
    training dicts if already loaded (else read from DATASETS.TRAIN)."""
    n, k = cfg.DATALOADER.EPISODE_CLASSES, cfg.DATALOADER.EPISODE_IMAGES_PER_CLASS
    per_gpu = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    if n * k != per_gpu:
        raise ValueError(f"DATALOADER.EPISODE_CLASSES x EPISODE_IMAGES_PER_CLASS = {n} x {k} must equal the "
                         f"per-GPU batch SOLVER.IMS_PER_BATCH / world size = {per_gpu}")
    if dicts is None:
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    seed = cfg.SEED if cfg.SEED >= 0 else 0  # the same on every rank: each takes its shard of one stream
    return torch.utils.data.DataLoader(
        MapDataset(dicts, mapper), batch_sampler=EpisodicBatchSampler(dicts, n, k, seed),
        num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed)

