"""Training and evaluation through Detectron2's DefaultTrainer, with steel-fsd's data and metrics."""
from __future__ import annotations

import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import DatasetEvaluators
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from detectron2.utils.file_io import PathManager

from ..data.episodic import SAMPLER_NAME, build_episodic_train_loader
from ..data.mapper import SteelDatasetMapper
from ..evaluation.coco import SteelCOCOEvaluator
from ..evaluation.prf import build_prf_evaluator
from ..modeling.support import attach_support

logger = logging.getLogger("steel_fsd")


class WeightsError(RuntimeError):
    """MODEL.WEIGHTS names a file that cannot be read."""


def check_weights(path: str) -> None:
    """Raise :class:`WeightsError` with a way forward if ``path`` (local or URL) cannot be read."""
    if not path:
        return
    try:
        local = PathManager.get_local_path(path)
        ok = os.path.isfile(local) and os.access(local, os.R_OK)
        reason = "no such readable file"
    except Exception as e:  # download or handler failures: offline machines, bad URLs
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        raise WeightsError(
            f"MODEL.WEIGHTS '{path}' cannot be read ({reason}). Download the weights and pass their local path "
            "(MODEL.WEIGHTS /path/R-50.pkl), or train from scratch with MODEL.WEIGHTS \"\" — the *_scratch_GN "
            "configs do this with GroupNorm, the usual choice without pretraining.")


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluators:
    """COCO AP/AP50/AP75 (+ per class) and precision/recall/F1 for one dataset."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return DatasetEvaluators([
        SteelCOCOEvaluator(dataset_name, output_dir=output_folder),
        build_prf_evaluator(cfg, dataset_name, output_folder),
    ])


class Trainer(DefaultTrainer):
    """DefaultTrainer with steel-fsd's mapper (harmonization + augmentation) and evaluators."""

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model, with the parameters named by MODEL.FREEZE frozen (fine-tuning)."""
        from ..modeling.freeze import freeze_parameters

        model = super().build_model(cfg)
        if cfg.MODEL.FREEZE:
            frozen = freeze_parameters(model, list(cfg.MODEL.FREEZE))
            logger.info("MODEL.FREEZE %s: %d parameter tensors frozen, %d trainable", list(cfg.MODEL.FREEZE),
                        len(frozen), sum(p.requires_grad for p in model.parameters()))
        return model

    def build_hooks(self):
        """Detectron2's hooks plus :class:`ValidationLoss` (before the writers, so its values are written)."""
        ret = super().build_hooks()
        if self.cfg.TEST.VAL_LOSS_DATASET and self.cfg.TEST.VAL_LOSS_PERIOD > 0:
            at = len(ret) - 1 if ret and isinstance(ret[-1], hooks.PeriodicWriter) else len(ret)
            ret.insert(at, ValidationLoss(self.cfg))
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = SteelDatasetMapper(cfg, is_train=True)
        if cfg.DATALOADER.SAMPLER_TRAIN == SAMPLER_NAME:
            return build_episodic_train_loader(cfg, mapper)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=SteelDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def train(self) -> dict[str, dict]:
        """Train, then return the final evaluation as ``{dataset_name: results}`` (see :func:`evaluate`)."""
        super().train()
        results = getattr(self, "_last_eval_results", None)  # set by DefaultTrainer's final EvalHook
        return _by_dataset(self.cfg, results) if results is not None else evaluate(self.cfg, self.model)

    def resume_or_load(self, resume: bool = True):
        has_ckpt = resume and self.checkpointer.has_checkpoint()
        if not has_ckpt:
            check_weights(self.cfg.MODEL.WEIGHTS)
        super().resume_or_load(resume=resume)


class ValidationLoss(HookBase):
    """Log the training losses on TEST.VAL_LOSS_DATASET as ``val_<loss>`` and ``val_total_loss``.

    Every TEST.VAL_LOSS_PERIOD iterations and at the last one; the same first TEST.VAL_LOSS_IMAGES
    annotated images each time, with test-time harmonization and no augmentation. Runs in training
    mode without gradient; buffers (e.g. the prototype memory bank) are restored afterwards and the
    model's own logging goes to a scratch storage, so training is unaffected.
    """

    def __init__(self, cfg: CfgNode):
        self.period, self.batch = cfg.TEST.VAL_LOSS_PERIOD, cfg.SOLVER.IMS_PER_BATCH
        eval_cfg = cfg.clone()
        eval_cfg.defrost()
        eval_cfg.INPUT.AUG.ENABLED = False
        mapper = SteelDatasetMapper(eval_cfg, is_train=True)
        dicts = [d for d in DatasetCatalog.get(cfg.TEST.VAL_LOSS_DATASET) if d.get("annotations")]
        self.inputs = [mapper(d) for d in dicts[:cfg.TEST.VAL_LOSS_IMAGES]]
        if not self.inputs:
            raise ValueError(f"TEST.VAL_LOSS_DATASET {cfg.TEST.VAL_LOSS_DATASET}: no annotated image")

    def losses(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean of each loss over the fixed validation batches."""
        saved = {n: b.detach().clone() for n, b in model.named_buffers()}
        totals: dict[str, float] = {}
        try:
            with torch.no_grad(), EventStorage(self.trainer.iter if hasattr(self, "trainer") else 0):
                for i in range(0, len(self.inputs), self.batch):
                    for k, v in model(self.inputs[i:i + self.batch]).items():
                        totals[k] = totals.get(k, 0.0) + float(v) * len(self.inputs[i:i + self.batch])
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])
        out = {f"val_{k}": v / len(self.inputs) for k, v in totals.items()}
        out["val_total_loss"] = sum(out.values())
        return out

    def after_step(self):
        nxt = self.trainer.iter + 1
        if nxt % self.period == 0 or nxt == self.trainer.max_iter:
            self.trainer.storage.put_scalars(**self.losses(self.trainer.model), smoothing_hint=False)


def evaluate(cfg: CfgNode, model: torch.nn.Module) -> dict[str, dict]:
    """Evaluate on every dataset of DATASETS.TEST: ``{dataset_name: {"bbox": ..., "prf": ...}}``."""
    return _by_dataset(cfg, Trainer.test(cfg, model))


def _by_dataset(cfg: CfgNode, results: dict) -> dict[str, dict]:
    names = list(cfg.DATASETS.TEST)
    if len(names) == 1 and names[0] not in results:  # DefaultTrainer.test unwraps a single dataset
        results = {names[0]: results}
    return dict(results)


def load_model_for_eval(cfg: CfgNode, resume: bool = False) -> torch.nn.Module:
    """Build the model of ``cfg`` in eval mode and load MODEL.WEIGHTS (or the last checkpoint with ``resume``),
    then MODEL.PROTOTYPE.SUPPORT_FILE if set."""
    model = build_model(cfg).eval()  # (Trainer.build_model would also log the whole architecture)
    checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    if not (resume and checkpointer.has_checkpoint()):
        check_weights(cfg.MODEL.WEIGHTS)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    if cfg.MODEL.PROTOTYPE.SUPPORT_FILE:
        attach_support(model, cfg, test_class_names(cfg))
    return model


def test_class_names(cfg: CfgNode) -> list[str]:
    """The class names shared by every DATASETS.TEST dataset (a prototype file must match them)."""
    names = [list(MetadataCatalog.get(d).thing_classes) for d in cfg.DATASETS.TEST]
    if any(n != names[0] for n in names):
        raise ValueError(f"DATASETS.TEST {list(cfg.DATASETS.TEST)} have different classes: evaluate them in separate runs")
    return names[0]
