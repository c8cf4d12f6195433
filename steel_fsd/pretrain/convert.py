"""A torchvision ResNet state dict (e.g. an ImageNet ``resnet50.pth`` a user already has) in Detectron2's
backbone names, loadable with ``MODEL.WEIGHTS`` without network access.

torchvision -> Detectron2: ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; ``layer{i}`` ->
``res{i+1}``; ``bn{k}`` -> ``conv{k}.norm``; ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``;
``fc`` dropped. torchvision's ResNets use BatchNorm and put the stride of a bottleneck in its 3x3 conv, so
the target config needs ``MODEL.RESNETS.NORM`` BN/FrozenBN/SyncBN and ``STRIDE_IN_1X1 False``.
"""
from __future__ import annotations

import re

import torch

_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def _rename(key: str) -> str | None:
    if key.startswith("fc."):
        return None
    m = _BLOCK.match(key)
    if not m:  # the stem
        return key.replace("conv1.", "stem.conv1.", 1) if key.startswith("conv1.") else \
            key.replace("bn1.", "stem.conv1.norm.", 1) if key.startswith("bn1.") else key
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def torchvision_to_detectron2(state: dict, prefix: str = "backbone.bottom_up.") -> dict[str, torch.Tensor]:
    """``state`` (a torchvision ResNet's ``state_dict()``, optionally under ``"state_dict"``/``"model"``) renamed
    to Detectron2's ResNet, each key under ``prefix`` (``backbone.bottom_up.`` for FPN models, ``backbone.``
    for C4 ones, ``""`` for a bare ResNet). ValueError for a dict that is not a torchvision ResNet."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "conv1.weight" not in state or not any(k.startswith("layer1.") for k in state):
        raise ValueError("not a torchvision ResNet state dict (no conv1.weight / layer1.*): "
                         f"first keys {sorted(state)[:5]}")
    out = {}
    for k, v in state.items():
        new = _rename(k)
        if new is not None:
            out[prefix + new] = v
    return out


def backbone_prefix(model_keys) -> str:
    """The prefix of a Detectron2 model's ResNet (``backbone.bottom_up.``, ``backbone.``...), from its keys."""
    for k in model_keys:
        if k.endswith("stem.conv1.weight"):
            return k[: -len("stem.conv1.weight")]
    raise ValueError("the model has no ResNet stem (stem.conv1.weight)")
