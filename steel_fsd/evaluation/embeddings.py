"""Embedding-space diagnostics of a prototype model: nearest-prototype confusion, distance statistics."""
from __future__ import annotations

import numpy as np
import torch


def nearest_prototype_confusion(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> np.ndarray:
    """(C, C) counts: row = true class, column = class of the nearest prototype (squared Euclidean)."""
    pred = torch.cdist(z, prototypes).argmin(1)
    C = len(prototypes)
    return np.bincount((labels * C + pred).numpy(), minlength=C * C).reshape(C, C)


def distance_stats(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> dict:
    """Intra/inter-class distances: to own vs other prototypes, and between embeddings.

    ``margin_ratio`` = mean inter-class / mean intra-class embedding distance (> 1: classes separate).
    """
    d_proto = torch.cdist(z, prototypes)
    own = d_proto.gather(1, labels[:, None]).squeeze(1)
    other = d_proto.masked_fill(torch.nn.functional.one_hot(labels, len(prototypes)).bool(), float("inf")).amin(1)
    d = torch.cdist(z, z)
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(len(z), dtype=torch.bool)
    intra, inter = d[same & off_diag], d[~same]
    stats = {"n": len(z), "to_own_prototype": float(own.mean()), "to_nearest_other_prototype": float(other.mean()),
             "intra_class": float(intra.mean()) if len(intra) else float("nan"),
             "inter_class": float(inter.mean()) if len(inter) else float("nan")}
    stats["margin_ratio"] = stats["inter_class"] / stats["intra_class"] if stats["intra_class"] > 0 else float("nan")
    stats["nearest_prototype_accuracy"] = float((d_proto.argmin(1) == labels).float().mean())
    return stats


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection of the rows of ``x`` on their first two principal axes: ``(coords, (mean, axes))``."""
    mean = x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    axes = v[:2].T
    return (x - mean) @ axes, (mean, axes)
