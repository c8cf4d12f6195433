"""Metric-learning losses for the prototype head."""
from __future__ import annotations

import torch


def pairwise_distances(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix of the rows of ``z`` (gradient-safe at zero distance)."""
    sq = (z.unsqueeze(1) - z.unsqueeze(0)).pow(2).sum(-1)
    return sq.clamp_min(eps).sqrt() * (sq > eps)


def batch_hard_triplet_loss(z: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017).

    For every anchor, the farthest same-label sample and the closest other-label sample in the batch
    give ``relu(d(a, p) - d(a, n) + margin)``; the loss is the mean over anchors that have at least one
    positive and one negative (0, with a gradient path, when none has).
    """
    d = pairwise_distances(z)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos, neg = same & ~eye, ~same
    hardest_pos = d.masked_fill(~pos, float("-inf")).amax(1)
    hardest_neg = d.masked_fill(~neg, float("inf")).amin(1)
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return z.sum() * 0.0
    return torch.relu(hardest_pos[valid] - hardest_neg[valid] + margin).mean()
