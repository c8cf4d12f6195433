"""Mixed precision: the autocast dtype of a device and precision name, and the autocast context itself.

One home for the choice used by training (``SOLVER.AMP``) and inference: ``"bfloat16"`` where the device
supports it (CPUs, and GPUs from Ampere on), else ``"float16"`` (older GPUs; training then scales the loss).
"""
from __future__ import annotations

import contextlib
import logging

import torch

__all__ = ["PRECISIONS", "amp_dtype", "autocast", "to_float32", "AutocastModel"]

logger = logging.getLogger(__name__)
PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` ("bfloat16" or "float16") on ``device``: bfloat16 on a CUDA device
    without bf16 support becomes float16 (logged); float16 on CPU becomes bfloat16 (CPU autocast is bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of {sorted(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    dtype = PRECISIONS[precision]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU has no bfloat16 support: mixed precision uses float16 (with loss scaling)")
        return torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("float16 autocast is not available on CPU: mixed precision uses bfloat16")
        return torch.bfloat16
    return dtype


def autocast(device: str | torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op context for ``dtype`` None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def to_float32(outputs):
    """A detector's outputs (lists / dicts of :class:`~detectron2.structures.Instances`, box structures and
    tensors) with every floating tensor in float32, as evaluators and exporters expect."""
    from detectron2.structures import Instances

    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(o) for o in outputs)
    if isinstance(outputs, dict):
        return {k: to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, Instances):
        return Instances(outputs.image_size, **{k: to_float32(v) for k, v in outputs.get_fields().items()})
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if torch.is_tensor(getattr(outputs, "tensor", None)):  # Boxes, RotatedBoxes
        return type(outputs)(to_float32(outputs.tensor))
    return outputs


class AutocastModel(torch.nn.Module):
    """``model`` whose forward runs under autocast with ``dtype`` and returns float32 outputs (inference)."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device, dtype: torch.dtype):
        super().__init__()
        self.model, self.device, self.dtype = model, torch.device(device), dtype

    def forward(self, *args, **kwargs):
        with autocast(self.device, self.dtype):
            return to_float32(self.model(*args, **kwargs))
