"""How a method adapts a trained model to a cell's K shots, by the ``adapt`` name a protocol file gives it.

An adapter is ``f(protocol, model, cfg, weights, setting, support_ds, manifest, shots, seed, test, work, opts)``
returning ``(results with "_adapt_s", gradient steps, fine-tune metrics.json or None)``; register more with
:func:`register_adapter` (methods whose cells are made outside the runner, such as the YOLO benchmark's,
write them with :class:`~steel_fsd.engine.protocol.cells.Cell`).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from detectron2.data import MetadataCatalog

from ..fewshot import evaluate_with_support, register_support
from ..trainer import Trainer, evaluate

ADAPTERS: dict[str, Callable] = {}


def register_adapter(name: str):
    """Decorator: make ``fn`` the adapter of ``adapt: name`` in protocol files."""
    def deco(fn: Callable) -> Callable:
        ADAPTERS[name] = fn
        return fn
    return deco


def parent_dataset(dataset: str) -> str:
    """The dataset a derived (manifest) dataset draws from."""
    return MetadataCatalog.get(dataset).parent


def support_eval(cfg, weights: str, support_ds: str, manifest: dict, shots: int, seed: int, test: str,
                 work: Path, wrap=None, novel: list[str] | None = None) -> dict:
    """Prototypes from the manifest's boxes (timed as ``_adapt_s``), then evaluation with them; ``wrap(model,
    cfg)`` (e.g. PCB) is applied to the loaded model and its time added to ``_adapt_s``. With ``novel``, only
    those classes' boxes are embedded; the others keep the model's trained prototypes."""
    work.mkdir(parents=True, exist_ok=True)
    protos = str(work / "prototypes.pt")
    start = time.perf_counter()
    register_support(cfg, weights, parent_dataset(support_ds), shots, seed, protos, manifest=manifest,
                     progress=False, classes=novel, with_trained=bool(novel))
    adapt_s = time.perf_counter() - start
    wrap_s = 0.0

    def timed_wrap(model, c):
        nonlocal wrap_s
        t0 = time.perf_counter()
        out = wrap(model, c)
        wrap_s = time.perf_counter() - t0
        return out
    res = evaluate_with_support(cfg, weights, protos, [test], output_dir=str(work),
                                wrap=timed_wrap if wrap else None)[test]
    return dict(res, _adapt_s=adapt_s + wrap_s)


def pcb_wrap(support_ds: str, manifest: dict, shots: int, seed: int, test: str):
    """``wrap(model, cfg)`` for :func:`support_eval` / :func:`finetune_eval`: prototype calibration (PCB) with
    the manifest's K boxes per class, weight TEST.PCB_ALPHA on the detector's score."""
    from detectron2.data import DatasetCatalog

    from ...data.support import manifest_support_dicts
    from ..fewshot import calibrated_model

    def wrap(model, cfg):
        parent = parent_dataset(support_ds)
        dicts = manifest_support_dicts(manifest, DatasetCatalog.get(parent))
        return calibrated_model(model, cfg, dicts, list(MetadataCatalog.get(parent).thing_classes), shots, seed,
                                list(MetadataCatalog.get(test).thing_classes), cfg.TEST.PCB_ALPHA)
    return wrap


def finetune_eval(protocol, model: str, cfg, weights: str, setting, support_ds: str, manifest: dict,
                  shots: int, seed: int, test: str, work: Path, method_opts: list[str], wrap=None) -> tuple[dict, int]:
    """Resize the base checkpoint to the target classes, fine-tune on the support set, evaluate on ``test``.

    Adaptation time covers prototype registration (prototype models), surgery, training and ``wrap(model,
    cfg)`` (e.g. PCB), not evaluation.
    """
    from ...modeling.surgery import resize_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    init = None
    if cfg.MODEL.ROI_HEADS.NAME == "PrototypeROIHeads":  # prototype-initialized fine-tune
        ps = register_support(cfg, weights, parent_dataset(support_ds), shots, seed, str(work / "prototypes.pt"),
                              manifest=manifest, progress=False)
        init = dict(zip(ps.class_names, ps.prototypes))
    src_classes = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes)
    target = protocol.classes(setting.target)
    resized = str(work / "model_resized.pth")
    resize_checkpoint(weights, resized, src_classes, target, seed=seed, init_prototypes=init)
    opts = protocol.base_opts + protocol.finetune_opts + [
        "MODEL.WEIGHTS", resized, "DATASETS.TRAIN", f"('{support_ds}',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(len(target)), "MODEL.RETINANET.NUM_CLASSES", str(len(target)),
        "SEED", str(seed), "INPUT.HARMONIZE.NORMALIZE", "False", "MODEL.PIXEL_MEAN", str(list(cfg.MODEL.PIXEL_MEAN)),
        "MODEL.PIXEL_STD", str(list(cfg.MODEL.PIXEL_STD)), "TEST.EVAL_PERIOD", "0", "TEST.VAL_LOSS_PERIOD", "0",
        "SOLVER.CHECKPOINT_PERIOD", "1000000"] + method_opts
    ft_cfg = protocol.config(model, opts, work)
    trainer = Trainer(ft_cfg)  # seeded by SEED
    trainer.resume_or_load(resume=False)
    trainer.train()
    c = ft_cfg.clone()
    c.defrost()
    c.DATASETS.TEST = (test,)
    adapted = wrap(trainer.model, c) if wrap else trainer.model
    adapt_s = time.perf_counter() - start
    os.remove(resized)  # an intermediate: the adapted model is OUTPUT_DIR/model_final.pth
    stats = Path(weights).parent / "pixel_stats.json"  # tools applying the adapted model read it from beside it
    if stats.is_file():
        shutil.copyfile(stats, work / "pixel_stats.json")
    res = evaluate(c, adapted)[test]
    return dict(res, _adapt_s=adapt_s), ft_cfg.SOLVER.MAX_ITER


@register_adapter("support")
def adapt_support(protocol, model, cfg, weights, setting, support_ds, manifest, shots, seed, test, work, opts):
    """Prototypes from the K shots, no gradient step."""
    return support_eval(cfg, weights, support_ds, manifest, shots, seed, test, work), 0, None


@register_adapter("support_novel")
def adapt_support_novel(protocol, model, cfg, weights, setting, support_ds, manifest, shots, seed, test, work, opts):
    """Prototypes of the novel classes from their K shots; the base classes keep the base model's trained
    prototypes (a new defect added to a running model: only its support images are embedded). In a cross
    setting every target class is new, so this is the plain swap."""
    novel = list(setting.novel) if setting.kind == "base_novel" else None
    return support_eval(cfg, weights, support_ds, manifest, shots, seed, test, work, novel=novel), 0, None


@register_adapter("finetune")
def adapt_finetune(protocol, model, cfg, weights, setting, support_ds, manifest, shots, seed, test, work, opts):
    """Checkpoint resized to the target classes, then FINETUNE_OPTS (+ the method's opts) on the K shots."""
    results, iters = finetune_eval(protocol, model, cfg, weights, setting, support_ds, manifest, shots, seed, test,
                                   work, opts)
    return results, iters, str(work / "metrics.json")


@register_adapter("support_pcb")
def adapt_support_pcb(protocol, model, cfg, weights, setting, support_ds, manifest, shots, seed, test, work, opts):
    """The prototype swap, then prototype calibration (PCB) of its detections with the same K shots."""
    wrap = pcb_wrap(support_ds, manifest, shots, seed, test)
    return support_eval(cfg, weights, support_ds, manifest, shots, seed, test, work, wrap), 0, None


@register_adapter("finetune_pcb")
def adapt_finetune_pcb(protocol, model, cfg, weights, setting, support_ds, manifest, shots, seed, test, work, opts):
    """The fine-tune, then prototype calibration (PCB) of its detections with the same K shots (DeFRCN)."""
    results, iters = finetune_eval(protocol, model, cfg, weights, setting, support_ds, manifest, shots, seed, test,
                                   work, opts, wrap=pcb_wrap(support_ds, manifest, shots, seed, test))
    return results, iters, str(work / "metrics.json")
