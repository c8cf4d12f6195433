#!/usr/bin/env python
"""Train or evaluate a steel-fsd model with Detectron2's conventions.

    python tools/train_net.py --config-file configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume          # continue from OUTPUT_DIR/last_checkpoint
"""
import sys

import _path  # noqa: F401
import torch
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import steel_fsd.data  # noqa: F401  (registers the datasets found under $STEEL_FSD_DATASETS)
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.engine.trainer import Trainer, load_model_for_eval


def setup(args):
    cfg = build_config(args.config_file, args.opts)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="steel_fsd")
    finalize_config(cfg)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = load_model_for_eval(cfg, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            from detectron2.evaluation import verify_results
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_gpus(args) -> None:
    if args.num_gpus > 1 and torch.cuda.device_count() < args.num_gpus:
        sys.exit(f"--num-gpus {args.num_gpus} needs {args.num_gpus} CUDA devices, found {torch.cuda.device_count()}: "
                 "Detectron2's launcher uses NCCL (GPUs only). Run with --num-gpus 1 on CPU.")


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    check_gpus(args)
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
