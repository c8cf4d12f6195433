"""Training and evaluation through Detectron2's DefaultTrainer, with steel-fsd's data and metrics."""
from __future__ import annotations

import logging
import os
import time

import torch
from detectron2.config import CfgNode
from detectron2.data import (DatasetCatalog, MetadataCatalog, build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, hooks
from detectron2.evaluation import DatasetEvaluators
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from ..data.episodic import SAMPLER_NAME, build_episodic_train_loader
from ..data.mapper import SteelDatasetMapper
from ..data.mixing import MixingMapper, mixing_enabled
from ..evaluation.coco import SteelCOCOEvaluator
from ..evaluation.image_level import ImageLevelEvaluator
from ..evaluation.prf import build_prf_evaluator
from ..modeling.checkpoint import SafeCheckpointer
from ..utils.amp import AutocastModel, amp_dtype, autocast
from ..utils.errors import UserError
from .ema import EMAHook, ModelEMA
from .launch import cpu_ddp
from .loading import check_weights, train_class_names, train_tile

logger = logging.getLogger("steel_fsd")


def _coco_and_prf(cfg: CfgNode, dataset_name: str, output_folder: str) -> list:
    """COCO AP/AP50/AP75 (+ per class, PR curves), precision/recall/F1 at the score threshold, and image-level
    defect recall at 1% and 5% false alarms on the defect-free images."""
    return [SteelCOCOEvaluator(dataset_name, output_dir=output_folder),
            build_prf_evaluator(cfg, dataset_name, output_folder),
            ImageLevelEvaluator(dataset_name, output_dir=output_folder)]


# MetadataCatalog evaluator_type -> the evaluators of that kind of dataset (as Detectron2's tools/train_net.py
# chooses them). Every steel dataset registers "coco"; so does register_coco_instances.
EVALUATORS = {"coco": _coco_and_prf}


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluators:
    """The evaluators of ``dataset_name``'s ``evaluator_type`` (a dataset registered without one counts as
    "coco", the only box-detection kind); an unknown type is an error naming the dataset."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if kind not in EVALUATORS:
        raise UserError(f"dataset {dataset_name!r} has evaluator_type {kind!r}", "its MetadataCatalog entry",
                        f"steel-fsd evaluates box detection: register it with evaluator_type in {sorted(EVALUATORS)}")
    return DatasetEvaluators(EVALUATORS[kind](cfg, dataset_name, output_folder))


class MixedPrecisionTrainer(AMPTrainer):
    """Detectron2's :class:`AMPTrainer` on any device and autocast dtype (``SOLVER.AMP.PRECISION``).

    Detectron2's runs float16 on CUDA only. Here the forward pass and the losses run under ``torch.autocast``
    of the model's device with ``dtype``; gradients are scaled only for float16 on CUDA (bfloat16 has float32's
    range and needs no scaling: the scaler is then disabled and is a pass-through). Heads that need float32
    (the prototype head's normalization, cosine logits and triplet distances) disable autocast themselves.
    """

    def __init__(self, model, data_loader, optimizer, dtype: torch.dtype, device: str):
        self.dtype, self.device = dtype, torch.device(device)
        scale = dtype == torch.float16 and self.device.type == "cuda"
        super().__init__(model, data_loader, optimizer, grad_scaler=torch.amp.GradScaler("cuda", enabled=scale))

    def run_step(self):
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with autocast(self.device, self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        if hasattr(self, "after_backward"):  # Detectron2 after v0.6
            self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


def mixed_precision(cfg: CfgNode) -> torch.dtype | None:
    """The autocast dtype of ``cfg``'s training (``SOLVER.AMP``) on MODEL.DEVICE, or None when it is off."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    return amp_dtype(cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE)


class Trainer(DefaultTrainer):
    """DefaultTrainer with steel-fsd's mapper (harmonization + augmentation) and evaluators; with
    ``SOLVER.AMP.ENABLED`` the :class:`MixedPrecisionTrainer` loop (bfloat16 where supported, any device)
    and, with ``TEST.AMP.ENABLED``, evaluation under the same autocast."""

    def __init__(self, cfg):
        # SEED >= 0 seeds every RNG before the model and the loader are built, as default_setup does for
        # tools/train_net.py: the demo, the protocol and the benchmarks build a Trainer without it.
        if cfg.SEED >= 0:
            seed_all_rng(cfg.SEED + comm.get_rank())
        with cpu_ddp():  # several CPU processes (steel_fsd.engine.launch): DDP without device_ids
            super().__init__(cfg)
        dtype = mixed_precision(cfg)
        if dtype is not None:  # DefaultTrainer built Detectron2's AMPTrainer (float16, CUDA only): replace it
            loop = self._trainer
            self._trainer = MixedPrecisionTrainer(loop.model, loop.data_loader, loop.optimizer, dtype, cfg.MODEL.DEVICE)
            logger.info("SOLVER.AMP: training under autocast with %s", dtype)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation; with ``TEST.AUG.ENABLED`` through Detectron2's test-time augmentation
        (``GeneralizedRCNNWithTTA``: ``TEST.AUG.FLIP`` and the sizes ``TEST.AUG.MIN_SIZES``, merged by NMS),
        under autocast with ``SOLVER.AMP.PRECISION`` when ``TEST.AMP.ENABLED``."""
        if cfg.TEST.AUG.ENABLED:
            model = GeneralizedRCNNWithTTA(cfg, model.module if hasattr(model, "module") else model)
            logger.info("TEST.AUG: evaluating with test-time augmentation (sizes %s, flip %s)",
                        tuple(cfg.TEST.AUG.MIN_SIZES), cfg.TEST.AUG.FLIP)
        if cfg.TEST.AMP.ENABLED:
            model = AutocastModel(model, cfg.MODEL.DEVICE, amp_dtype(cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE))
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model, with the parameters named by MODEL.FREEZE frozen (fine-tuning), and ROI heads that
        leave objectness-only boxes (class -1, which train the RPN) out of their samples."""
        from ..modeling.freeze import freeze_parameters
        from ..modeling.objectness import ignore_objectness_only

        model = super().build_model(cfg)
        if getattr(model, "roi_heads", None) is not None:
            ignore_objectness_only(model.roi_heads, cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0])
        elif any(MetadataCatalog.get(n).get("objectness_only") for n in cfg.DATASETS.TRAIN):
            raise UserError(f"objectness-only datasets in DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)} train an RPN; "
                            f"{cfg.MODEL.META_ARCHITECTURE} has none", "", "use them with a two-stage config")
        if cfg.MODEL.FREEZE:
            frozen = freeze_parameters(model, list(cfg.MODEL.FREEZE))
            logger.info("MODEL.FREEZE %s: %d parameter tensors frozen, %d trainable", list(cfg.MODEL.FREEZE),
                        len(frozen), sum(p.requires_grad for p in model.parameters()))
        return model

    def build_hooks(self):
        """Detectron2's hooks plus :class:`ValidationLoss` (before the writers, so its values are written).

        First DefaultTrainer's checkpointer is replaced by a :class:`SafeCheckpointer` (restricted reading,
        atomic writes, resume past a torn checkpoint, training class names saved) with the same model and
        checkpointables, before the PeriodicCheckpointer hook takes it.
        """
        ck = self.checkpointer
        self.checkpointer = SafeCheckpointer(ck.model, ck.save_dir, class_names=train_class_names(self.cfg),
                                             train_tile=train_tile(self.cfg), save_to_disk=ck.save_to_disk,
                                             **ck.checkpointables)
        ret = super().build_hooks()
        if self.cfg.MODEL_EMA.ENABLED:
            ema = ModelEMA(ck.model, self.cfg.MODEL_EMA.DECAY)
            self.checkpointer.add_checkpointable("model_ema", ema)
            at = next(i + 1 for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler))
            ret.insert(at, EMAHook(ema))
        if self.cfg.TEST.VAL_LOSS_DATASET and self.cfg.TEST.VAL_LOSS_PERIOD > 0:
            at = len(ret) - 1 if ret and isinstance(ret[-1], hooks.PeriodicWriter) else len(ret)
            ret.insert(at, ValidationLoss(self.cfg))
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = SteelDatasetMapper(cfg, is_train=True)
        dicts = None
        if mixing_enabled(cfg):  # mosaic / copy-paste draw other training images
            dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
            mapper = MixingMapper(cfg, mapper, dicts)
        if cfg.DATALOADER.SAMPLER_TRAIN == SAMPLER_NAME:
            return build_episodic_train_loader(cfg, mapper, dicts)
        return build_detection_train_loader(cfg, mapper=mapper, **({"dataset": dicts} if dicts is not None else {}))

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
