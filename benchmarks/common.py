"""Shared helpers for the benchmarks: timing of training iterations and inference on a config."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

import torch  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from steel_fsd.engine.setup import build_config, finalize_config  # noqa: E402
from steel_fsd.engine.trainer import Trainer  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

for _name in ("detectron2", "fvcore", "steel_fsd"):  # once per process: progress, ETA and results on stdout
    setup_logger(name=_name)


def machine() -> dict:
    """Where the numbers were measured."""
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def save(name: str, result: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` (with the machine description) and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"benchmark": name, "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


def synthetic_datasets() -> None:
    """Generate (or reuse) the synthetic datasets under the datasets root and register them."""
    from steel_fsd.data import register_all
    from steel_fsd.data.catalog import datasets_root

    root = datasets_root()
    subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--out", root], check=True)
    register_all(root)


def config(config_file: str, opts: list[str]):
    cfg = build_config(str(REPO / config_file), opts + ["DATALOADER.NUM_WORKERS", "0"])
    return finalize_config(cfg)


def time_training(cfg, iters: int, warmup: int = 3) -> float:
    """Seconds per training iteration (forward, backward, SGD step), after ``warmup`` iterations."""
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    model.train()
    opt = Trainer.build_optimizer(cfg, model)
    batches = iter(Trainer.build_train_loader(cfg))
    with EventStorage():
        for i in range(warmup + iters):
            if i == warmup:
                start = time.perf_counter()
            batch = next(batches)
            loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (time.perf_counter() - start) / iters


@torch.no_grad()
def time_inference(cfg, n_images: int, warmup: int = 2, model=None) -> float:
    """Seconds per image of model inference (one image per call, preprocessing excluded)."""
    model = model or Trainer.build_model(cfg)
    model.eval()
    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    inputs = [b for _, b in zip(range(warmup + n_images), loader)]
    for b in inputs[:warmup]:
        model(b)
    start = time.perf_counter()
    for b in inputs[warmup:]:
        model(b)
    return (time.perf_counter() - start) / max(1, len(inputs) - warmup)
