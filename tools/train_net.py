#!/usr/bin/env python
"""Train or evaluate a steel-fsd model with Detectron2's conventions.

    python tools/train_net.py --config-file configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume          # continue from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file CFG --num-gpus 2      # 2 processes: NCCL on GPUs, gloo on CPU
"""
import os
import sys

import _path  # noqa: F401
import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from steel_fsd.data import register_datasets
from steel_fsd.engine.launch import launch
from steel_fsd.engine.setup import build_config, check_config_paths, finalize_config
from steel_fsd.engine.loading import load_model_for_eval
from steel_fsd.engine.trainer import Trainer
from steel_fsd.utils.cli import UserError, add_dataset_args, output_lock, run_main


def setup(args):
    register_datasets(None, getattr(args, "dataset", ()), getattr(args, "datasets_file", ()))  # in every process: launch()'s workers do not inherit the catalog
    cfg = build_config(args.config_file, args.opts)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="steel_fsd")
    # One process at a time may write OUTPUT_DIR/pixel_stats.json: rank 0, then each machine's first, then the rest.
    turn = 0 if comm.is_main_process() else 1 if comm.get_local_rank() == 0 else 2
    for t in range(3):
        if t == turn:
            # evaluation applies the weights with their training run's pixel statistics (and, for a prototype
            # swap through MODEL.PROTOTYPE.SUPPORT_FILE, their trained class count)
            finalize_config(cfg, datasets_used(args), weights=cfg.MODEL.WEIGHTS if args.eval_only else None,
                            swap=args.eval_only and bool(cfg.MODEL.PROTOTYPE.SUPPORT_FILE))
        comm.synchronize()
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


def datasets_used(args) -> tuple[str, ...]:
    """The DATASETS keys this run reads: evaluation alone reads only DATASETS.TEST."""
    return ("TEST",) if args.eval_only else ("TRAIN", "TEST")


def check_gpus(args) -> None:
    """On a machine with CUDA, --num-gpus N needs N devices (one NCCL process each); without CUDA it means
    N CPU processes (gloo)."""
    found = torch.cuda.device_count()
    if torch.cuda.is_available() and args.num_gpus > found:
        raise UserError(f"--num-gpus {args.num_gpus} needs {args.num_gpus} CUDA devices, found {found}",
                        "on this machine (one process per GPU, NCCL)",
                        f"pass --num-gpus {found} or fewer (without CUDA, --num-gpus N runs N CPU processes with gloo)")


def cli(argv: list[str]) -> int:
    """Parse Detectron2's standard arguments, check the config in this process (so mistakes are reported
    once, before any worker starts), then launch ``main`` on every process."""
    parser = default_argument_parser()
    parser.add_argument("--datasets-root", help="datasets folder to register (default $STEEL_FSD_DATASETS, else "
                        "./datasets)")
    add_dataset_args(parser)
    args = parser.parse_args(argv)
    if args.datasets_root:  # through the environment: launch()'s worker processes register from it too
        os.environ["STEEL_FSD_DATASETS"] = os.path.abspath(args.datasets_root)
    check_gpus(args)
    register_datasets(None, args.dataset, args.datasets_file)  # $STEEL_FSD_DATASETS (default ./datasets) and the user's
    cfg = build_config(args.config_file, args.opts)
    check_config_paths(cfg, datasets_used(args))
    print("Command Line Args:", args)
    with output_lock(cfg.OUTPUT_DIR):  # held by this (launching) process while its workers run
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(cli))
