#!/usr/bin/env python
"""Convert a torchvision ResNet state dict already on disk (e.g. an ImageNet resnet50.pth) into a Detectron2
checkpoint for one config, so it loads with MODEL.WEIGHTS without any download.

    python tools/convert_torchvision.py --weights resnet50.pth --config-file CFG --out R50_tv.pth [KEY VALUE ...]

The config must build a ResNet with BatchNorm (MODEL.RESNETS.NORM FrozenBN, BN or SyncBN; GroupNorm
configs cannot take BatchNorm weights) and, for R50 and deeper, MODEL.RESNETS.STRIDE_IN_1X1 False (torchvision
strides in the 3x3 conv). Train with the printed pixel statistics (torchvision's RGB mean/std).
"""
from __future__ import annotations

import argparse
import sys

import _path  # noqa: F401  (a source checkout works without installing steel_fsd)

from steel_fsd.engine.setup import build_config
from steel_fsd.modeling.checkpoint import atomic_save, read_weights_file
from steel_fsd.pretrain import backbone_prefix, torchvision_to_detectron2
from steel_fsd.utils.cli import UserError, check_output_file, run_main

TORCHVISION_PIXELS = ["INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]",
                      "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]", "INPUT.HARMONIZE.NORMALIZE", "False"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, help="torchvision ResNet state dict (.pth)")
    ap.add_argument("--config-file", required=True, help="the Detectron2 config the weights are for")
    ap.add_argument("--out", required=True)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = ap.parse_args(argv)
    cfg = build_config(args.config_file, args.opts)
    res = cfg.MODEL.RESNETS
    if res.NORM not in ("FrozenBN", "BN", "SyncBN", "naiveSyncBN"):
        raise UserError(f"MODEL.RESNETS.NORM is {res.NORM!r}: torchvision ResNets carry BatchNorm weights",
                        args.config_file, "use a BatchNorm config (e.g. MODEL.RESNETS.NORM FrozenBN)")
    if res.DEPTH >= 50 and res.STRIDE_IN_1X1:
        raise UserError("MODEL.RESNETS.STRIDE_IN_1X1 is True: torchvision puts a bottleneck's stride in its 3x3 conv",
                        args.config_file, "add MODEL.RESNETS.STRIDE_IN_1X1 False (here and when training)")
    check_output_file(args.out, "--out")
    from detectron2.modeling import build_model

    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model_state = build_model(cfg).state_dict()
    prefix = backbone_prefix(model_state)
    try:
        converted = torchvision_to_detectron2(read_weights_file(args.weights), prefix)
    except ValueError as e:
        raise UserError(str(e), args.weights, "pass a torchvision ResNet state dict (torchvision.models.resnetNN)")
    want = {k for k in model_state if k.startswith(prefix)}
    wrong = sorted(k for k in want & set(converted) if converted[k].shape != model_state[k].shape)
    missing = sorted(k for k in want - set(converted) if not k.endswith("num_batches_tracked"))
    if wrong or missing:
        raise UserError(f"the weights do not fit the config's ResNet-{res.DEPTH}: shapes differ for {wrong[:3]}, "
                        f"missing {missing[:3]}", args.weights, "pass the torchvision ResNet of the config's depth")
    atomic_save({"model": {k: v for k, v in converted.items() if k in want}}, args.out)
    print(f"wrote {args.out}: {len(want)} backbone tensors ({prefix}*); train with\n  MODEL.WEIGHTS {args.out} "
          + " ".join(f"{k} '{v}'" if " " in v else f"{k} {v}" for k, v in zip(TORCHVISION_PIXELS[::2], TORCHVISION_PIXELS[1::2])))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
