"""The few-shot protocol: settings x methods x K x seeds, each cell adapted, evaluated and written as JSON.

A protocol file (YAML, see ``configs/protocols/``) names the datasets (train/val/test split names under a
short key such as ``neu``), the models (Detectron2 config files), the methods (a model and how it
adapts), the settings, the shots and seeds. :class:`Protocol` runs it:

* ``base_novel``: a dataset's classes split into base and novel; the base model trains on images holding
  only base classes; adaptation uses a K-shot manifest over all classes (TFA's balanced fine-tuning set);
  evaluation on the test split over all classes, bAP/nAP over the base/novel classes.
* ``cross``: the base model trains on all classes of ``source``; adaptation with K shots per class of
  ``target``; evaluation on ``target``'s test split.
* ``kshot`` (in-domain): no base model; the model trains from MODEL.WEIGHTS (scratch offline) on the K-shot
  set of all classes of ``dataset``, then is evaluated on its test split.
* ``VARIANTS``: ablation / preprocessing rows, each a model trained on a dataset's train split and evaluated
  on its test split with its trained classifier (prototype models: the memory bank), ``shots`` 0.

Methods adapt by ``support`` (prototypes from the K shots with :func:`register_support`, no gradient
step) or ``finetune`` (the base checkpoint resized to the target classes by
:func:`~steel_fsd.modeling.surgery.resize_checkpoint`, prototype banks initialized from the support
prototypes, then FINETUNE_OPTS, e.g. backbone and RPN frozen). Every trained model and every cell is
cached on disk: a rerun skips what is finished and resumes an interrupted training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.support import annotation_sources, assert_disjoint, kshot_manifest, write_manifest
from ..data.catalog import require_registered
from ..data.splits import sha256_files
from ..data.subsets import register_class_subset, register_manifest
from ..evaluation.aggregate import read_cell
from ..utils.io import write_json
from ..evaluation.report import METRICS, per_class_rows
from ..utils.cli import UserError
from .fewshot import evaluate_with_support, register_support
from .setup import build_config, finalize_config
from .trainer import Trainer, evaluate

logger = logging.getLogger("steel_fsd")

KINDS = ("base_novel", "cross", "kshot")
ADAPT = ("support", "finetune")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One protocol setting; ``source``/``target`` are dataset keys of the protocol file."""

    kind: str
    source: str
    target: str
    novel: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """A readable label (also the cells' folder name); never parsed."""
        if self.kind == "base_novel":
            return f"base_novel_{self.source}_novel-{'+'.join(self.novel)}"
        return f"cross_{self.source}-{self.target}" if self.kind == "cross" else f"kshot_{self.target}"

    @staticmethod
    def parse(spec: dict, datasets: dict) -> "Setting":
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"setting {spec}: kind must be one of {KINDS}")
        src = spec.get("source", spec.get("dataset"))
        tgt = spec.get("target", spec.get("dataset"))
        for key in (src, tgt):
            if key not in datasets:
                raise ValueError(f"setting {spec}: dataset {key!r} is not in DATASETS {sorted(datasets)}")
        return Setting(kind, src, tgt, tuple(spec.get("novel", ())))


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def cell_record(results: dict, classes: list[str], base: list[str], novel: list[str]) -> dict:
    """The metric part of a cell: mean row, per-class rows, bAP/nAP (NaN-ignoring means), all in percent.

    A model that predicts no box at all gets AP 0 (Detectron2 reports NaN for "no predictions"), flagged
    ``no_predictions``.
    """
    rows = per_class_rows(results, classes)
    bbox = results.get("bbox", {})
    empty = bool(bbox) and all(isinstance(v, float) and math.isnan(v) for v in bbox.values())
    if empty:
        for r in rows:
            r.update(AP=0.0, AP50=0.0, AP75=0.0)
    per_class = {r["class"]: {m: r[m] for m in METRICS} for r in rows[:-1]}
    rec = {"metrics": {m: rows[-1][m] for m in METRICS}, "per_class": per_class, "no_predictions": empty}
    for tag, group in (("b", base), ("n", novel)):
        for m in ("AP", "AP50"):
            rec[f"{tag}{m}"] = _mean([per_class[c][m] for c in group]) if base else None
    return rec


class Protocol:
    """A protocol file, ready to run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, out_dir: str | None = None, shots: list[int] | None = None,
                 seeds: list[int] | None = None, methods: list[str] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"protocol file {self.path} not found", "", "give one of configs/protocols/*.yaml")
        spec = yaml.safe_load(self.path.read_text())
        missing = [k for k in ("DATASETS", "MODELS", "METHODS", "SETTINGS") if k not in spec]
        if missing:
            raise ValueError(f"{self.path}: missing keys {missing}")
        self.datasets: dict[str, dict] = spec["DATASETS"]
        self.models: dict[str, str] = spec["MODELS"]
        unknown = sorted(set(methods or []) - set(spec["METHODS"]))
        if unknown:
            raise UserError(f"methods {unknown} are not in the protocol file", str(self.path),
                            f"choose from {sorted(spec['METHODS'])}")
        self.methods: dict[str, dict] = {m: spec["METHODS"][m] for m in (methods or spec["METHODS"])}
        self.method_order = list(spec["METHODS"])  # tables and plots list methods in the file's order
        self.pairs = [tuple(p) for p in spec.get("PAIRED", [])]  # seed-paired comparisons a - b in the report
        if any(len(p) != 2 or not all(isinstance(m, str) for m in p) for p in self.pairs):
            raise ValueError(f"{self.path}: PAIRED must list [method_a, method_b] pairs, got {spec['PAIRED']}")
        for name, m in self.methods.items():
            if m.get("model") not in self.models or m.get("adapt") not in ADAPT:
                raise ValueError(f"{self.path}: method {name}: needs model (one of {sorted(self.models)}) and "
                                 f"adapt (one of {ADAPT}), got {m}")
        self.settings = [Setting.parse(s, self.datasets) for s in spec["SETTINGS"]]
        self.variants: dict[str, dict] = spec.get("VARIANTS", {})
        for kind, rows in self.variants.items():
            for row, v in rows.items():
                if v.get("model") not in self.models or v.get("dataset") not in self.datasets:
                    raise ValueError(f"{self.path}: VARIANTS {kind} {row!r}: needs model (one of {sorted(self.models)}) "
                                     f"and dataset (one of {sorted(self.datasets)}), got {v}")
        self.shots = list(shots or spec.get("SHOTS", [1, 5, 10]))
        self.seeds = list(seeds if seeds is not None else spec.get("SEEDS", [0, 1, 2]))
        self.out = Path(out_dir or spec.get("OUTPUT_DIR", "output/fewshot"))
        self.base_opts = [str(v) for v in spec.get("BASE_OPTS", [])]
        self.finetune_opts = [str(v) for v in spec.get("FINETUNE_OPTS", [])]
        self.kshot_opts = [str(v) for v in spec.get("KSHOT_OPTS", [])]

    # ----- datasets -----------------------------------------------------------------------------
    def split(self, key: str, part: str) -> str:
        name = self.datasets[key][part]
        require_registered(name, f"{self.path} DATASETS.{key}.{part}")
        return name

    def classes(self, key: str) -> list[str]:
        return list(MetadataCatalog.get(self.split(key, "train")).thing_classes)

    def manifest(self, key: str, shots: int, seed: int) -> Path:
        """The K-shot manifest of ``key``'s train split (written once; disjoint from its test split)."""
        train = self.split(key, "train")
        path = self.out / "manifests" / f"{train}_{shots}shot_seed{seed}.json"
        if not path.is_file():
            digest = sha256_files(annotation_sources(MetadataCatalog.get(train).dataset_root))["sha256"]
            m = kshot_manifest(DatasetCatalog.get(train), self.classes(key), shots, seed, digest, train)
            assert_disjoint(m, DatasetCatalog.get(self.split(key, "test")))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_manifest(path, m)
        return path

    def manifest_dataset(self, key: str, shots: int, seed: int) -> tuple[str, dict]:
        """Register (and return the name of) the dataset of a manifest's support boxes."""
        path = self.manifest(key, shots, seed)
        name = f"fewshot:{path.stem}"
        return name, register_manifest(name, self.split(key, "train"), path)

    # ----- training -----------------------------------------------------------------------------
    def config(self, model: str, opts: list[str], out_dir: Path):
        """The finalized config of ``model`` with ``opts`` and OUTPUT_DIR ``out_dir``."""
        cfg = build_config(self.models[model], opts + ["OUTPUT_DIR", str(out_dir)])
        return finalize_config(cfg)

    def train(self, model: str, train_ds: str, val_ds: str, opts: list[str], label: str, seed: int = 0):
        """Train (or resume, or reuse) ``model`` on ``train_ds``; returns (finalized cfg, weights path)."""
        n = len(MetadataCatalog.get(train_ds).thing_classes)
        opts = opts + ["DATASETS.TRAIN", f"('{train_ds}',)", "DATASETS.TEST", f"('{val_ds}',)",
                       "MODEL.ROI_HEADS.NUM_CLASSES", str(n), "MODEL.RETINANET.NUM_CLASSES", str(n), "SEED", str(seed),
                       "TEST.VAL_LOSS_DATASET", val_ds]
        # the folder is keyed by the whole merged config, so editing a config file (or its _BASE_) retrains
        key = hashlib.sha256(build_config(self.models[model], opts).dump().encode()).hexdigest()[:8]
        out_dir = self.out / "models" / f"{label}-{key}"
        cfg = self.config(model, opts, out_dir)
        weights = out_dir / "model_final.pth"
        if not weights.is_file():
            logger.info("[protocol] training %s on %s -> %s", model, train_ds, out_dir)
            torch.manual_seed(seed)
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=True)
            start = time.perf_counter()
            trainer.train()
            write_json(out_dir / "train_info.json", {
                "model": model, "config": self.models[model], "train": train_ds, "val": val_ds, "seed": seed,
                "iterations": cfg.SOLVER.MAX_ITER, "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
                "num_images": len(DatasetCatalog.get(train_ds)), "seconds": round(time.perf_counter() - start, 1)})
        return cfg, str(weights)

    def base_model(self, model: str, setting: Setting):
        """The base model of a setting (shared by every method built on ``model``)."""
        src = setting.source
        if setting.kind == "base_novel":
            base = [c for c in self.classes(src) if c not in setting.novel]
            name = f"base:{self.split(src, 'train')}:{'+'.join(base)}"
            register_class_subset(name, self.split(src, "train"), base)
            val = f"base:{self.split(src, 'val')}:{'+'.join(base)}"
            register_class_subset(val, self.split(src, "val"), base)
            return self.train(model, name, val, self.base_opts, f"{model}_{src}_base-{'+'.join(base)}")
        return self.train(model, self.split(src, "train"), self.split(src, "val"), self.base_opts, f"{model}_{src}")

    # ----- cells --------------------------------------------------------------------------------
    def cell_path(self, setting: Setting, method: str, shots: int, seed: int) -> Path:
        return self.out / "cells" / setting.name / method / f"K{shots}_seed{seed}.json"

    def run_cell(self, setting: Setting, method: str, shots: int, seed: int) -> dict:
        """Adapt, evaluate and write one cell (skipped when its JSON exists)."""
        path = self.cell_path(setting, method, shots, seed)
        if path.is_file():
            return read_cell(path)
        classes = self.classes(setting.target)
        base, novel = (([c for c in classes if c not in setting.novel], list(setting.novel))
                       if setting.kind == "base_novel" else ([], classes))
        test = self.split(setting.target, "test")
        results, iters, train_metrics, base_metrics = self._adapt(setting, method, shots, seed, test,
                                                                  path.with_suffix(""))
        cell = {"setting": setting.name, "kind": setting.kind, "source": setting.source, "target": setting.target,
                "method": method, "shots": shots, "seed": seed, "classes": classes, "base_classes": base,
                "novel_classes": novel, "adapt_s": round(results.pop("_adapt_s"), 2), "adapt_iters": iters,
                "manifest": os.path.relpath(self.manifest(setting.target, shots, seed), path.parent),
                **_links(path, test, train_metrics, base_metrics), **cell_record(results, classes, base, novel if base else [])}
        write_json(path, cell)
        logger.info("[protocol] %s %s K=%d seed=%d: AP %.1f AP50 %.1f (%.1f s adaptation)", setting.name, method,
                    shots, seed, cell["metrics"]["AP"], cell["metrics"]["AP50"], cell["adapt_s"])
        return cell

    def _adapt(self, setting: Setting, method: str, shots: int, seed: int, test: str,
               work: Path) -> tuple[dict, int, str | None, str]:
        """Adapt by ``method`` with the (K, seed) manifest of the target and evaluate on ``test``.

        Returns (results with ``_adapt_s``, gradient steps, fine-tune metrics.json, base metrics.json).
        """
        spec = self.methods[method]
        support_ds, manifest = self.manifest_dataset(setting.target, shots, seed)
        if setting.kind == "kshot":  # adaptation = training on the K shots (+ prototype registration)
            cfg, weights = self.train(spec["model"], support_ds, self.split(setting.target, "val"), self.kshot_opts,
                                      f"{spec['model']}_kshot_{self.manifest(setting.target, shots, seed).stem}", seed)
            metrics = str(Path(cfg.OUTPUT_DIR) / "metrics.json")
            train_s = json.loads((Path(cfg.OUTPUT_DIR) / "train_info.json").read_text())["seconds"]
            if spec["adapt"] == "support":
                results = self._support_eval(cfg, weights, support_ds, manifest, shots, seed, test, work)
                results["_adapt_s"] += train_s
            else:
                results = dict(evaluate_with_support(cfg, weights, "", [test], str(work))[test], _adapt_s=train_s)
            return results, cfg.SOLVER.MAX_ITER, metrics, metrics
        cfg, weights = self.base_model(spec["model"], setting)
        base_metrics = str(Path(cfg.OUTPUT_DIR) / "metrics.json")
        if spec["adapt"] == "support":
            return self._support_eval(cfg, weights, support_ds, manifest, shots, seed, test, work), 0, None, base_metrics
        results, iters = self._finetune(spec["model"], cfg, weights, setting, support_ds, manifest, shots, seed, test,
                                        work, [str(v) for v in spec.get("opts", [])])
        return results, iters, str(work / "metrics.json"), base_metrics

    def _support_eval(self, cfg, weights: str, support_ds: str, manifest: dict, shots: int, seed: int, test: str,
                      work: Path) -> dict:
        """Prototypes from the manifest's boxes (timed as ``_adapt_s``), then evaluation with them."""
        work.mkdir(parents=True, exist_ok=True)
        protos = str(work / "prototypes.pt")
        start = time.perf_counter()
        register_support(cfg, weights, self._parent(support_ds), shots, seed, protos, manifest=manifest,
                         progress=False)
        adapt_s = time.perf_counter() - start
        res = evaluate_with_support(cfg, weights, protos, [test], output_dir=str(work))[test]
        return dict(res, _adapt_s=adapt_s)

    @staticmethod
    def _parent(dataset: str) -> str:
        return MetadataCatalog.get(dataset).parent

    def _finetune(self, model: str, cfg, weights: str, setting: Setting, support_ds: str, manifest: dict,
                  shots: int, seed: int, test: str, work: Path, method_opts: list[str]) -> tuple[dict, int]:
        """Resize the base checkpoint to the target classes, fine-tune on the support set, evaluate on ``test``.

        Adaptation time covers prototype registration (prototype models), surgery and training, not evaluation.
        """
        from ..modeling.surgery import resize_checkpoint

        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        init = None
        if cfg.MODEL.ROI_HEADS.NAME == "PrototypeROIHeads":  # prototype-initialized fine-tune
            ps = register_support(cfg, weights, self._parent(support_ds), shots, seed, str(work / "prototypes.pt"),
                                  manifest=manifest, progress=False)
            init = dict(zip(ps.class_names, ps.prototypes))
        src_classes = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes)
        target = self.classes(setting.target)
        resized = str(work / "model_resized.pth")
        resize_checkpoint(weights, resized, src_classes, target, seed=seed, init_prototypes=init)
        opts = self.base_opts + self.finetune_opts + [
            "MODEL.WEIGHTS", resized, "DATASETS.TRAIN", f"('{support_ds}',)", "DATASETS.TEST", "()",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(len(target)), "MODEL.RETINANET.NUM_CLASSES", str(len(target)),
            "SEED", str(seed), "INPUT.HARMONIZE.NORMALIZE", "False", "MODEL.PIXEL_MEAN", str(list(cfg.MODEL.PIXEL_MEAN)),
            "MODEL.PIXEL_STD", str(list(cfg.MODEL.PIXEL_STD)), "TEST.EVAL_PERIOD", "0", "TEST.VAL_LOSS_PERIOD", "0",
            "SOLVER.CHECKPOINT_PERIOD", "1000000"] + method_opts
        ft_cfg = self.config(model, opts, work)
        torch.manual_seed(seed)
        trainer = Trainer(ft_cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        adapt_s = time.perf_counter() - start
        os.remove(resized)  # an intermediate: the adapted model is OUTPUT_DIR/model_final.pth
        c = ft_cfg.clone()
        c.defrost()
        c.DATASETS.TEST = (test,)
        res = evaluate(c, trainer.model)[test]
        return dict(res, _adapt_s=adapt_s), ft_cfg.SOLVER.MAX_ITER

    # ----- variants (ablation / preprocessing rows) ---------------------------------------------------
    def run_variant(self, kind: str, row: str, spec: dict, seed: int = 0) -> dict:
        """Train ``spec["model"]`` (+ ``spec["opts"]``) on ``spec["dataset"]``'s train split, evaluate on its test split."""
        key, model = spec["dataset"], spec["model"]
        slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", row).strip("_")
        path = self.out / "cells" / f"{kind}_{key}" / slug / f"K0_seed{seed}.json"
        if path.is_file():
            return read_cell(path)
        opts = self.base_opts + [str(v) for v in spec.get("opts", [])]
        cfg, weights = self.train(model, self.split(key, "train"), self.split(key, "val"), opts,
                                  f"{model}_{key}" + (f"_{slug}" if spec.get("opts") else ""), seed)
        test, classes = self.split(key, "test"), self.classes(key)
        results = evaluate_with_support(cfg, weights, "", [test], str(path.with_suffix("")))[test]
        cell = {"setting": f"{kind}_{key}", "kind": kind, "source": key, "target": key, "method": row, "shots": 0,
                "seed": seed, "classes": classes, "base_classes": [], "novel_classes": classes, "adapt_s": 0.0,
                "adapt_iters": 0, **_links(path, test, None, str(Path(cfg.OUTPUT_DIR) / "metrics.json")),
                **cell_record(results, classes, [], [])}
        write_json(path, cell)
        return cell

    # ----- everything -----------------------------------------------------------------------------
    def cells(self, only: list[Setting] | None = None) -> list[tuple]:
        """Every (setting, method, K, seed) to run, in order."""
        out = []
        for s in only or self.settings:
            out += [(s, method, k, seed) for method in self.methods for k in self.shots for seed in self.seeds]
        return out

    def select(self, kinds: list[str] | None = None, cross: list[str] | None = None,
               only: list[str] | None = None) -> list[Setting]:
        """The settings of the given kinds, cross directions (``SRC->TGT``) or names (all when none is given)."""
        if only:
            names = {s.name: s for s in self.settings}
            if set(only) - set(names):
                raise UserError(f"--only {sorted(set(only) - set(names))}: no such setting", str(self.path),
                                f"choose from {sorted(names)} (--list prints them)")
            return [names[n] for n in only]
        chosen = [s for s in self.settings if (cross and s.kind == "cross" and f"{s.source}->{s.target}" in cross)
                  or (kinds and s.kind in kinds)]
        if cross:
            known = {f"{s.source}->{s.target}" for s in self.settings if s.kind == "cross"}
            unknown = sorted(set(cross) - known)
            if unknown:
                raise UserError(f"--cross {unknown}: no such cross setting", str(self.path), f"choose from {sorted(known)}")
        return chosen if (kinds or cross) else list(self.settings)

    def run(self, settings: list[Setting] | None = None, variants: bool = True) -> dict:
        """Run (or resume) every cell of ``settings`` (default: all) and, with ``variants``, the VARIANTS rows,
        logging progress and ETA; then write results.json/csv, report.md and the plots. Returns
        :func:`~steel_fsd.evaluation.fewshot_report.write_report`'s summary (``markdown``, ``plots``)."""
        todo = self.cells(settings)
        extra = [(kind, row, spec) for kind, rows in self.variants.items() for row, spec in rows.items()] if variants else []
        total, start = len(todo) + len(extra), time.perf_counter()
        logger.info("[protocol] %d cells + %d variant rows -> %s", len(todo), len(extra), self.out)
        for i, job in enumerate(todo + extra, 1):
            t0 = time.perf_counter()
            cell = self.run_cell(*job) if isinstance(job[0], Setting) else self.run_variant(*job)
            done = time.perf_counter() - start
            ap50 = cell["metrics"]["AP50"]
            logger.info("[protocol] %d/%d %s %s K=%s seed=%s: AP50 %.1f (%.0f s; elapsed %.0f s, ETA %.0f s)", i, total,
                        cell["setting"], cell["method"], cell["shots"], cell["seed"], math.nan if ap50 is None else ap50,
                        time.perf_counter() - t0, done, done / i * (total - i))
        return self.report()

    def report(self) -> dict:
        """Rebuild results.json/csv, report.md and the plots from the finished cells (methods in the file's
        order, the file's PAIRED comparisons)."""
        from ..evaluation.fewshot_report import write_report

        return write_report(self.out, self.method_order, self.pairs)


def _links(cell_path: Path, test: str, train_metrics: str | None, base_metrics: str | None) -> dict:
    """A cell's links (relative to its folder, None when absent): PR curves, fine-tune and base metrics.json."""
    def rel(p: str | None) -> str | None:
        return os.path.relpath(p, cell_path.parent) if p and os.path.isfile(p) else None
    pr = cell_path.with_suffix("") / "inference" / test / "pr_curves.json"
    return {"pr_curves": rel(str(pr)), "train_metrics": rel(train_metrics), "base_metrics": rel(base_metrics)}

