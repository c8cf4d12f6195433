"""Contrastive objectives for self-supervised backbone pretraining.

* SimCLR (Chen et al. 2020): two augmented views of each image; NT-Xent pulls each view towards its
  partner and away from the other 2N - 2 views of the batch.
* NNCLR (Dwibedi et al. 2021): the positive of a view is its nearest neighbour in a FIFO support queue of
  earlier embeddings, which gives positives more varied than augmentations of one image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's normalized temperature-scaled cross entropy for N pairs of views ``z1[i]``, ``z2[i]`` (N x D).

    Each of the 2N views is classified among the other 2N - 1 by cosine similarity / temperature, its partner
    being the right answer; the loss is the mean over the 2N views.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent: two N x D batches expected, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own candidate
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class SupportQueue:
    """NNCLR's support set: the last ``size`` (L2-normalized, detached) embeddings, first in, first out."""

    def __init__(self, size: int, dim: int):
        if size < 1:
            raise ValueError(f"support queue size must be >= 1, got {size}")
        self.items = torch.zeros(0, dim)
        self.size = size

    def __len__(self) -> int:
        return self.items.shape[0]

    def push(self, z: torch.Tensor) -> None:
        z = F.normalize(z.detach().float().cpu(), dim=1)
        self.items = torch.cat([self.items, z])[-self.size:]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """For each row of ``z``, the queue entry of highest cosine similarity (on ``z``'s device)."""
        if not len(self):
            raise ValueError("the support queue is empty: push a batch first")
        q = self.items.to(z.device)
        return q[(F.normalize(z, dim=1) @ q.t()).argmax(dim=1)]


def nnclr_loss(z1: torch.Tensor, z2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, queue: SupportQueue,
               temperature: float = 0.1) -> torch.Tensor:
    """Symmetric NNCLR loss: the nearest neighbour (in ``queue``) of view 1's projection ``z1`` is the query
    whose positive is view 2's prediction ``p2``, against the other predictions of the batch; and the other way
    round. The queue is updated with ``z1`` afterwards."""
    def one_side(nn: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(nn, dim=1) @ F.normalize(p, dim=1).t() / temperature
        return F.cross_entropy(logits, torch.arange(p.shape[0], device=p.device))

    if not len(queue):
        queue.push(z1)
    loss = 0.5 * (one_side(queue.nearest(z1), p2) + one_side(queue.nearest(z2), p1))
    queue.push(z1)
    return loss
