"""Few-shot adaptation by prototype swap: build a prototype file from K supports, evaluate with it."""
from __future__ import annotations

import logging
import os
import time

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.fewshot_splits import manifest_support_dicts
from ..data.mapper import SteelDatasetMapper
from ..data.subsets import restrict_classes
from ..modeling.prototypes import PrototypeSet, append_class, build_prototypes, file_sha256, load_prototypes, save_prototypes
from ..modeling.support import relevant_config, support_dicts_from_manifest
from ..utils.cli import UserError
from .trainer import evaluate, load_model_for_eval

logger = logging.getLogger("steel_fsd")


def register_support(cfg: CfgNode, weights: str, dataset: str, shots: int, seed: int, out: str,
                     classes: list[str] | None = None, manifest: list[dict] | dict | None = None,
                     manifest_path: str = "manifest", append_to: str | None = None,
                     progress: bool = True) -> PrototypeSet:
    """Prototypes of ``dataset``'s classes (or ``classes``) from K seeded supports; written to ``out``."""
    if shots < 1:
        raise UserError(f"--shots {shots}: K must be at least 1 (boxes per class)", "", "pass --shots 1, 5 or 10")
    start = time.perf_counter()
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS, cfg.MODEL.PROTOTYPE.SUPPORT_FILE = weights, ""
    cfg.freeze()
    model = load_model_for_eval(cfg, check_classes=False)  # the support classes may be new ones
    if not hasattr(model.roi_heads, "box_predictor") or not hasattr(model.roi_heads.box_predictor, "embed_features"):
        raise UserError(f"{cfg.MODEL.META_ARCHITECTURE}/{cfg.MODEL.ROI_HEADS.NAME} has no prototype head to embed "
                        "support boxes with", weights, "use a prototype config (configs/prototype/*.yaml) and a model "
                        "trained with it; stock models adapt by fine-tuning (tools/ckpt_surgery.py)")
    dicts = DatasetCatalog.get(dataset)
    class_names = list(MetadataCatalog.get(dataset).thing_classes)
    if isinstance(manifest, dict):  # a K-shot manifest from tools/prepare_fewshot.py: exact boxes, classes checked
        dicts = manifest_support_dicts(manifest, dicts)
    elif manifest is not None:  # a hand-written list of {image_key[, bbox]}
        dicts = support_dicts_from_manifest(dicts, manifest, manifest_path)
    if classes:
        dicts, class_names = restrict_classes(dicts, class_names, list(classes)), list(classes)
    logger.info("register_support: %s classes %s, K=%d, seed=%d", dataset, class_names, shots, seed)
    ps = build_prototypes(model, dicts, class_names, SteelDatasetMapper(cfg, is_train=False), shots, seed, progress)
    ps.weights_sha256, ps.config = file_sha256(weights), relevant_config(cfg)
    if append_to:
        ps = append_class(load_prototypes(append_to), ps)
    save_prototypes(ps, out)
    logger.info("register_support: wrote %s (%d classes x %d, %d support boxes) in %.1f s", out, len(ps.class_names),
                ps.embed_dim, len(ps.support), time.perf_counter() - start)
    return ps


def evaluate_with_support(cfg: CfgNode, weights: str, support_file: str, datasets: list[str],
                          output_dir: str | None = None) -> dict[str, dict]:
    """Evaluate ``weights`` on ``datasets`` predicting exactly the classes of ``support_file`` (``""``: the
    model's own classifier or memory bank); evaluator files under ``output_dir``/inference, default cfg.OUTPUT_DIR."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS, cfg.MODEL.PROTOTYPE.SUPPORT_FILE = weights, support_file
    cfg.DATASETS.TEST = tuple(datasets)
    cfg.OUTPUT_DIR = output_dir or cfg.OUTPUT_DIR
    cfg.freeze()
    return evaluate(cfg, load_model_for_eval(cfg))


def kshot_results(cfg: CfgNode, weights: str, support_dataset: str, test_dataset: str, shots: list[int],
                  seed: int, out_dir: str) -> dict[int, dict]:
    """For each K: register K supports per class from ``support_dataset``, evaluate on ``test_dataset``.

    Returns ``{K: {"bbox": ..., "prf": ..., "register_s": seconds}}``; prototype files are kept in ``out_dir``.
    """
    os.makedirs(out_dir, exist_ok=True)
    out = {}
    for k in shots:
        path = os.path.join(out_dir, f"protos_{support_dataset}_K{k}_seed{seed}.pt")
        start = time.perf_counter()
        register_support(cfg, weights, support_dataset, k, seed, path, progress=False)
        elapsed = time.perf_counter() - start
        out[k] = dict(evaluate_with_support(cfg, weights, path, [test_dataset])[test_dataset], register_s=round(elapsed, 2))
    return out
