"""How a method adapts a trained model to a cell's K shots, by the ``adapt`` name a protocol file gives it.

An adapter, a function registered in :data:`ADAPTERS` (fvcore's ``Registry``) under its own name (register
more with ``@ADAPTERS.register()``), takes one
:class:`AdaptContext` and returns ``(results with "_adapt_s", gradient steps, fine-tune metrics.json or None)``.
Methods whose cells are made outside the runner, such as the YOLO benchmark's, write them with
:class:`~steel_fsd.fewshot.protocol.cells.Cell`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from detectron2.data import MetadataCatalog
from fvcore.common.registry import Registry

from ...engine.trainer import Trainer, evaluate
from ..adapt import evaluate_with_support, register_support

ADAPTERS = Registry("STEEL_FSD_ADAPTERS")
ADAPTERS.__doc__ = "Few-shot adaptation methods of the protocol, by the name protocol files give in ``adapt``."


def adapter_names() -> list[str]:
    return sorted(name for name, _ in ADAPTERS)


@dataclasses.dataclass
class AdaptContext:
    """One cell's adaptation: the protocol, the trained model (name, finalized config, weights), the setting, the
    K-shot support dataset and its manifest, K, the seed, the test split, the cell's work folder and the
    method's extra config overrides."""

    protocol: object
    model: str
    cfg: object
    weights: str
    setting: object
    support_ds: str
    manifest: dict
    shots: int
    seed: int
    test: str
    work: Path
    opts: list[str] = dataclasses.field(default_factory=list)


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

    from ..adapt import calibrated_model
    from ..support import manifest_support_dicts

    def wrap(model, cfg):
        parent = parent_dataset(support_ds)
        dicts = manifest_support_dicts(manifest, DatasetCatalog.get(parent))
        return calibrated_model(model, cfg, dicts, list(MetadataCatalog.get(parent).thing_classes), shots, seed,
                                list(MetadataCatalog.get(test).thing_classes), cfg.TEST.PCB_ALPHA)
    return wrap


def finetune_eval(ctx: AdaptContext, wrap=None) -> tuple[dict, int]:
    """Resize the base checkpoint to the target classes, fine-tune on the support set, evaluate on the test split.

    Adaptation time covers prototype registration (prototype models), surgery, training and ``wrap(model,
    cfg)`` (e.g. PCB), not evaluation.
    """
    from ...modeling.surgery import resize_checkpoint

    protocol, model, cfg, weights, setting = ctx.protocol, ctx.model, ctx.cfg, ctx.weights, ctx.setting
    support_ds, manifest, shots, seed, test, work = (ctx.support_ds, ctx.manifest, ctx.shots, ctx.seed, ctx.test,
                                                     ctx.work)
    method_opts = ctx.opts

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


def _support(ctx: AdaptContext, wrap=None, novel=None) -> dict:
    """The swap with the base model's config and the method's ``opts`` (test-time keys, e.g.
    ``MODEL.RPN.POST_NMS_TOPK_TEST 1000`` for more proposals at adaptation time)."""
    cfg = ctx.cfg
    if ctx.opts:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.merge_from_list(ctx.opts)
        cfg.freeze()
    return support_eval(cfg, ctx.weights, ctx.support_ds, ctx.manifest, ctx.shots, ctx.seed, ctx.test, ctx.work,
                        wrap, novel)


def _pcb(ctx: AdaptContext):
    return pcb_wrap(ctx.support_ds, ctx.manifest, ctx.shots, ctx.seed, ctx.test)


@ADAPTERS.register()
def support(ctx: AdaptContext):
    """Prototypes from the K shots, no gradient step."""
    return _support(ctx), 0, None


@ADAPTERS.register()
def support_novel(ctx: AdaptContext):
    """Prototypes of the novel classes from their K shots; the base classes keep the base model's trained
    prototypes (a new defect added to a running model: only its support images are embedded). In a cross
    setting every target class is new, so this is the plain swap."""
    return _support(ctx, novel=list(ctx.setting.novel) if ctx.setting.kind == "base_novel" else None), 0, None


@ADAPTERS.register()
def finetune(ctx: AdaptContext):
    """Checkpoint resized to the target classes, then FINETUNE_OPTS (+ the method's opts) on the K shots."""
    results, iters = finetune_eval(ctx)
    return results, iters, str(ctx.work / "metrics.json")


@ADAPTERS.register()
def support_pcb(ctx: AdaptContext):
    """The prototype swap, then prototype calibration (PCB) of its detections with the same K shots."""
    return _support(ctx, wrap=_pcb(ctx)), 0, None


@ADAPTERS.register()
def finetune_pcb(ctx: AdaptContext):
    """The fine-tune, then prototype calibration (PCB) of its detections with the same K shots (DeFRCN)."""
    results, iters = finetune_eval(ctx, wrap=_pcb(ctx))
    return results, iters, str(ctx.work / "metrics.json")
