"""The protocol runner: trains (or reuses) the base models, adapts and evaluates every cell, writes the cells,
then the report. Every trained model and every cell is cached on disk: a rerun skips what is finished and
resumes an interrupted training."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...data.catalog import dataset_digest
from ...data.splits import sha256_files
from ...data.subsets import register_class_subset
from ...engine.setup import build_config, finalize_config
from ...engine.trainer import Trainer
from ...evaluation.aggregate import read_cell
from ...utils.io import file_sha256, write_json
from ..adapt import evaluate_with_support
from ..support import annotation_sources, assert_disjoint, kshot_manifest, register_manifest, write_manifest
from .cells import Cell
from .methods import ADAPTERS, AdaptContext, support_eval
from .spec import ProtocolSpec, Setting

logger = logging.getLogger("steel_fsd")


def _num(v) -> float:
    """A metric for %-formatting: None (NaN as written to JSON) as nan."""
    return math.nan if v is None else v


def model_identity(cfg) -> str:
    """The merged config as text, for a model folder's key, without the keys that cannot change the trained
    weights at their current values (the prototype head's keys in a model without it, mixed-precision choices
    while mixed precision is off): changing or adding such keys in the package does not retrain models."""
    cfg = cfg.clone()
    cfg.defrost()
    if cfg.MODEL.ROI_HEADS.NAME != "PrototypeROIHeads":
        cfg.MODEL.pop("PROTOTYPE", None)
    if not cfg.SOLVER.AMP.ENABLED:
        cfg.SOLVER.AMP.pop("PRECISION", None)
    if not cfg.TEST.get("AMP", {}).get("ENABLED", False):
        cfg.TEST.pop("AMP", None)
    return cfg.dump()


class Protocol(ProtocolSpec):
    """A protocol file, ready to run (see :mod:`steel_fsd.fewshot.protocol`)."""

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

    def train(self, model: str, train_ds: str, val_ds: str, opts: list[str], label: str, seed: int = 0,
              extra_train: tuple[str, ...] = ()):
        """Train (or resume, or reuse) ``model`` on ``train_ds`` (and ``extra_train``, e.g. objectness views);
        returns (finalized cfg, weights path)."""
        n = len(MetadataCatalog.get(train_ds).thing_classes)
        pretrained = self.pretrained_weights(model)
        if pretrained:
            opts = opts + ["MODEL.WEIGHTS", pretrained]
        if extra_train:  # objectness views hold images without class boxes: keep them
            opts = opts + ["DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False"]
        opts = opts + ["DATASETS.TRAIN", str((train_ds, *extra_train)), "DATASETS.TEST", f"('{val_ds}',)",
                       "MODEL.ROI_HEADS.NUM_CLASSES", str(n), "MODEL.RETINANET.NUM_CLASSES", str(n), "SEED", str(seed),
                       "TEST.VAL_LOSS_DATASET", val_ds]
        # the folder is keyed by the whole merged config, so editing a config file (or its _BASE_) retrains
        # (and by the pretrained backbone's content: re-pretraining into the same file retrains too), and by the
        # content of its datasets: edited annotations or another image list retrain
        key = hashlib.sha256((model_identity(build_config(self.models[model], opts))
                              + (file_sha256(pretrained) if pretrained else "")
                              + "".join(dataset_digest(d) for d in (train_ds, *extra_train))
                              + dataset_digest(val_ds)).encode()).hexdigest()[:8]
        out_dir = self.models_dir / f"{label}-{key}"
        cfg = self.config(model, opts, out_dir)
        weights = out_dir / "model_final.pth"
        if not weights.is_file():
            logger.info("[protocol] training %s on %s -> %s", model, train_ds, out_dir)
            trainer = Trainer(cfg)  # seeded by SEED
            trainer.resume_or_load(resume=True)
            start = time.perf_counter()
            trainer.train()
            write_json(out_dir / "train_info.json", {
                "model": model, "config": self.models[model], "train": train_ds, "val": val_ds, "seed": seed,
                "iterations": cfg.SOLVER.MAX_ITER, "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
                "num_images": len(DatasetCatalog.get(train_ds)), "seconds": round(time.perf_counter() - start, 1)})
        return cfg, str(weights)

    def objectness_views(self, setting: Setting, classes: list[str]) -> tuple[str, ...]:
        """The BASE_OBJECTNESS datasets' training splits as objectness views (registered here), leaving out the
        setting's source and target."""
        from ...data.objectness import register_objectness_view

        out = []
        for key in self.base_objectness:
            if key in (setting.source, setting.target):
                continue
            name = f"objectness:{self.split(key, 'train')}"
            register_objectness_view(name, self.split(key, "train"), classes)
            out.append(name)
        return tuple(out)

    def base_model(self, model: str, setting: Setting):
        """The base model of a setting (shared by every method built on ``model``)."""
        src = setting.source
        if setting.kind == "base_novel":
            base = [c for c in self.classes(src) if c not in setting.novel]
            name = f"base:{self.split(src, 'train')}:{'+'.join(base)}"
            register_class_subset(name, self.split(src, "train"), base)
            val = f"base:{self.split(src, 'val')}:{'+'.join(base)}"
            register_class_subset(val, self.split(src, "val"), base)
            extra = self.objectness_views(setting, base)
            return self.train(model, name, val, self.base_opts,
                              f"{model}_{src}_base-{'+'.join(base)}" + ("+objectness" if extra else ""),
                              extra_train=extra)
        extra = self.objectness_views(setting, self.classes(src))
        return self.train(model, self.split(src, "train"), self.split(src, "val"), self.base_opts,
                          f"{model}_{src}" + ("+objectness" if extra else ""), extra_train=extra)

    def base_reference(self, setting: Setting, model: str) -> dict:
        """The no-forgetting reference of a base/novel setting: bAP and bAP50 of ``model``'s base model itself
        on the target's test split restricted to the base classes (every image kept, novel boxes erased, so a
        base-class detection on a novel defect is a false positive, as in the cells). Evaluated once per base
        model and kept as ``base_test_<split>.json`` in its folder."""
        cfg, weights = self.base_model(model, setting)
        test = self.split(setting.target, "test")
        path = Path(cfg.OUTPUT_DIR) / f"base_test_{test}.json"
        if not path.is_file():
            base = [c for c in self.classes(setting.target) if c not in setting.novel]
            name = f"base:{test}:{'+'.join(base)}"
            register_class_subset(name, test, base, drop_images_with_others=False)
            logger.info("[protocol] base model %s on %s (the no-forgetting reference)", cfg.OUTPUT_DIR, name)
            res = evaluate_with_support(cfg, weights, "", [name], str(path.with_suffix("")))[name]["bbox"]
            write_json(path, {"test": test, "base_classes": base, "bAP": res["AP"], "bAP50": res["AP50"]})
        return json.loads(path.read_text())

    def _base_reference_fields(self, setting: Setting, method: str, bap50: float | None) -> dict:
        """A base/novel cell's fields from its base model's reference: bAP / bAP50 and ``dbAP50``, the change of
        bAP50 (the cell's ``bap50``) that the adaptation caused."""
        ref = self.base_reference(setting, self.methods[method]["model"])
        return {"base_model_bAP": ref["bAP"], "base_model_bAP50": ref["bAP50"],
                "dbAP50": None if bap50 is None or ref["bAP50"] is None else bap50 - ref["bAP50"]}

    # ----- cells --------------------------------------------------------------------------------
    def cell_path(self, setting: Setting, method: str, shots: int, seed: int) -> Path:
        return self.out / "cells" / setting.name / method / f"K{shots}_seed{seed}.json"

    def run_cell(self, setting: Setting, method: str, shots: int, seed: int) -> dict:
        """Adapt, evaluate and write one cell (skipped when its JSON exists)."""
        path = self.cell_path(setting, method, shots, seed)
        if path.is_file():
            cell = read_cell(path)
            if cell["kind"] == "base_novel" and "dbAP50" not in cell:  # finished before the reference existed
                cell.update(self._base_reference_fields(setting, method, cell.get("bAP50")))
                write_json(path, cell)
            return cell
        classes = self.classes(setting.target)
        base, novel = (([c for c in classes if c not in setting.novel], list(setting.novel))
                       if setting.kind == "base_novel" else ([], classes))
        test = self.split(setting.target, "test")
        results, iters, train_metrics, base_metrics = self._adapt(setting, method, shots, seed, test,
                                                                  path.with_suffix(""))
        made = Cell.from_results(path, results, test, setting=setting.name, kind=setting.kind, source=setting.source,
                                 target=setting.target, method=method, shots=shots, seed=seed, classes=classes,
                                 base=base, novel=novel, adapt_s=results.pop("_adapt_s"), adapt_iters=iters,
                                 train_metrics=train_metrics, base_metrics=base_metrics,
                                 manifest=self.manifest(setting.target, shots, seed))
        if setting.kind == "base_novel":
            made.extra.update(self._base_reference_fields(setting, method, made.record.get("bAP50")))
        cell = made.write(path)
        logger.info("[protocol] %s %s K=%d seed=%d: AP %.1f AP50 %.1f (%.1f s adaptation)", setting.name, method,
                    shots, seed, _num(cell["metrics"]["AP"]), _num(cell["metrics"]["AP50"]), cell["adapt_s"])
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
                results = support_eval(cfg, weights, support_ds, manifest, shots, seed, test, work)
                results["_adapt_s"] += train_s
            else:
                results = dict(evaluate_with_support(cfg, weights, "", [test], str(work))[test], _adapt_s=train_s)
            return results, cfg.SOLVER.MAX_ITER, metrics, metrics
        cfg, weights = self.base_model(spec["model"], setting)
        base_metrics = str(Path(cfg.OUTPUT_DIR) / "metrics.json")
        ctx = AdaptContext(self, spec["model"], cfg, weights, setting, support_ds, manifest, shots, seed, test, work,
                           [str(v) for v in spec.get("opts", [])])
        results, iters, train_metrics = ADAPTERS.get(spec["adapt"])(ctx)
        return results, iters, train_metrics, base_metrics

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
        return Cell.from_results(path, results, test, setting=f"{kind}_{key}", kind=kind, source=key, target=key,
                                 method=row, shots=0, seed=seed, classes=classes, base=[], novel=classes, adapt_s=0.0,
                                 adapt_iters=0, base_metrics=str(Path(cfg.OUTPUT_DIR) / "metrics.json")).write(path)

    # ----- everything -----------------------------------------------------------------------------
    def run(self, settings: list[Setting] | None = None, variants: bool = True, cells: bool = True) -> dict:
        """Run (or resume) every cell of ``settings`` (default: all; none without ``cells``) and, with ``variants``,
        the VARIANTS rows, logging progress and ETA; then write results.json/csv, report.md and the plots. Returns
        :func:`~steel_fsd.evaluation.fewshot_report.write_report`'s summary (``markdown``, ``plots``)."""
        todo = self.cells(settings) if cells else []
        self.check_classes(sorted({job[0] for job in todo}, key=lambda s: s.name))
        extra = [(kind, row, spec) for kind, rows in self.variants.items() for row, spec in rows.items()] if variants else []
        total, start = len(todo) + len(extra), time.perf_counter()
        logger.info("[protocol] %d cells + %d variant rows -> %s", len(todo), len(extra), self.out)
        for i, job in enumerate(todo + extra, 1):
            t0 = time.perf_counter()
            cell = self.run_cell(*job) if isinstance(job[0], Setting) else self.run_variant(*job)
            done = time.perf_counter() - start
            ap50 = cell["metrics"]["AP50"]
            logger.info("[protocol] %d/%d %s %s K=%s seed=%s: AP50 %.1f (%.0f s; elapsed %.0f s, ETA %.0f s)", i, total,
                        cell["setting"], cell["method"], cell["shots"], cell["seed"], _num(ap50),
                        time.perf_counter() - t0, done, done / i * (total - i))
        return self.report()

    def report(self) -> dict:
        """Rebuild results.json/csv, report.md and the plots from the finished cells (methods in the file's
        order, the file's PAIRED comparisons)."""
        from ...evaluation.fewshot_report import write_report

        return write_report(self.out, self.method_order, self.pairs)
