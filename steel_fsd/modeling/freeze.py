"""Freezing parameter groups by name (e.g. ``MODEL.FREEZE: ["backbone", "proposal_generator"]``).

Freeze before the optimizer is built (Detectron2's ``get_default_optimizer_params`` skips parameters
with ``requires_grad=False``) and before the model is wrapped in DistributedDataParallel.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel


def _matches(name: str, prefix: str) -> bool:
    """Whether the dotted ``name`` starts with the whole dotted components of ``prefix``."""
    return name == prefix or name.startswith(prefix + ".")


def freeze_parameters(model: torch.nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter under one of ``prefixes`` and return their names.

    Prefixes match whole components ("backbone" matches "backbone.bottom_up.stem.conv1.weight", not
    "backbone2.x"); names are those of the unwrapped model (no DDP ``module.``). Raises ValueError,
    freezing nothing, when a prefix matches no parameter.
    """
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    prefixes = [p.strip(".") for p in prefixes]
    params = dict(model.named_parameters())
    unmatched = [p for p in prefixes if not any(_matches(n, p) for n in params)]
    if unmatched:
        top = sorted({n.split(".", 1)[0] for n in params})
        raise ValueError(f"freeze prefixes {unmatched} match no parameter of {type(model).__name__} "
                         f"(top-level modules with parameters: {top})")
    frozen = [n for n in params if any(_matches(n, p) for p in prefixes)]
    for n in frozen:
        params[n].requires_grad_(False)
    return frozen
