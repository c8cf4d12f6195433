"""Few-shot adaptation by prototype swap: build a prototype file from K supports, evaluate with it.

The supports come from :mod:`steel_fsd.fewshot.support` (seeded sampling, K-shot manifests, hand-written
lists), their embeddings from the head (:meth:`PrototypeROIHeads.embed_boxes`), and the file format from
:mod:`steel_fsd.fewshot.prototypes`; :func:`register_support` is the one function that joins them.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode

from ..data.mapper import SteelDatasetMapper
from ..data.subsets import restrict_classes
from ..engine.loading import load_model_for_eval, train_class_names
from ..engine.trainer import evaluate
from ..modeling.checkpoint import checkpoint_classes, read_weights_file
from ..utils.errors import UserError
from ..utils.io import file_sha256
from .prototypes import PrototypeSet, append_class, load_prototypes, relevant_config, save_prototypes
from .support import entries_from_list, manifest_support_dicts, sample_support

logger = logging.getLogger("steel_fsd")


def register_support(cfg: CfgNode, weights: str, dataset: str, shots: int, seed: int, out: str,
                     classes: list[str] | None = None, manifest: list[dict] | dict | None = None,
                     manifest_path: str = "manifest", append_to: str | None = None,
                     progress: bool = True, with_trained: bool = False, strict: bool = False) -> PrototypeSet:
    """Prototypes of ``dataset``'s classes (or ``classes``) from K seeded supports; written to ``out``.

    A class with fewer than K boxes uses all of them, with a warning stating the boxes used per class
    (``strict``: a :class:`UserError` instead).

    ``append_to``: added to that prototype file's classes. ``with_trained``: added to the model's own
    prototypes (:func:`trained_prototypes`) of the classes it was trained on, so only ``classes`` are embedded
    (a new defect joins the trained ones; adaptation costs the new class's support images alone)."""
    if append_to and with_trained:
        raise UserError("append to a prototype file or to the model's trained classes, not both", "",
                        "drop --append-to or --with-trained")
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
    if manifest is not None:  # a K-shot manifest (tools/prepare_fewshot.py) or a hand-written {image_key[, bbox]} list
        if not isinstance(manifest, dict):
            manifest = {"supports": entries_from_list(manifest, dicts, class_names, manifest_path)}
        dicts = manifest_support_dicts(manifest, dicts)
    if classes:
        dicts, class_names = restrict_classes(dicts, class_names, list(classes)), list(classes)
    logger.info("register_support: %s classes %s, K=%d, seed=%d", dataset, class_names, shots, seed)
    ps = build_prototypes(model, dicts, class_names, SteelDatasetMapper(cfg, is_train=False), shots, seed, progress)
    used = {c: sum(1 for s in ps.support if s["class"] == c) for c in class_names}
    short = {c: n for c, n in used.items() if n < shots}
    if short:  # a class with fewer than K boxes uses all it has: say so, or refuse under strict
        message = (f"--shots {shots}: {dataset} has fewer boxes for {sorted(short)}; boxes used per class: {used}")
        if strict:
            raise UserError(message, "", f"lower --shots to {min(used.values())} or drop --strict")
        logger.warning("register_support: %s (all of them; --strict refuses this)", message)
    ps.weights_sha256, ps.config = file_sha256(weights), relevant_config(cfg)
    if append_to:
        ps = append_class(load_prototypes(append_to), ps)
    elif with_trained:
        merged = append_class(trained_prototypes(model, cfg, ps.weights_sha256), ps)
        merged.shots, merged.seed = ps.shots, ps.seed
        ps = merged
    save_prototypes(ps, out)
    logger.info("register_support: wrote %s (%d classes x %d, %d support boxes) in %.1f s", out, len(ps.class_names),
                ps.embed_dim, len(ps.support), time.perf_counter() - start)
    return ps


def trained_prototypes(model, cfg: CfgNode, weights_sha256: str = "") -> PrototypeSet:
    """The prototypes a prototype-head model uses without a support file (its training bank, or its learned
    prototypes), named by the classes stored in MODEL.WEIGHTS (else those of DATASETS.TRAIN); ``shots`` 0,
    no support boxes."""
    names = checkpoint_classes(read_weights_file(cfg.MODEL.WEIGHTS)) or train_class_names(cfg)
    protos = model.roi_heads.box_predictor.active_prototypes().detach().cpu().float()
    if not names or len(names) != len(protos):
        raise UserError(f"the model holds {len(protos)} trained prototypes, but the names of the classes it was "
                        f"trained on are {'unknown' if not names else names}", cfg.MODEL.WEIGHTS,
                        "use a checkpoint written by steel-fsd, or pass DATASETS.TRAIN of the base model")
    return PrototypeSet(list(names), protos.clone(), 0, 0, [], weights_sha256, relevant_config(cfg),
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def evaluate_with_support(cfg: CfgNode, weights: str, support_file: str, datasets: list[str],
                          output_dir: str | None = None, wrap=None) -> dict[str, dict]:
    """Evaluate ``weights`` on ``datasets`` predicting exactly the classes of ``support_file`` (``""``: the
    model's own classifier or memory bank); evaluator files under ``output_dir``/inference, default cfg.OUTPUT_DIR.
    ``wrap(model, cfg)`` may replace the loaded model for evaluation (e.g. :func:`calibrated_model`)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS, cfg.MODEL.PROTOTYPE.SUPPORT_FILE = weights, support_file
    cfg.DATASETS.TEST = tuple(datasets)
    cfg.OUTPUT_DIR = output_dir or cfg.OUTPUT_DIR
    cfg.freeze()
    model = load_model_for_eval(cfg)
    return evaluate(cfg, wrap(model, cfg) if wrap else model)


def embed_instances(model, picks: list[tuple[dict, int]], mapper, progress: bool = False, embed=None,
                    batch_size: int = 8) -> torch.Tensor:
    """Embeddings (N, D) of the annotated boxes ``[(dataset_dict, annotation_index), ...]``.

    ``mapper`` is the evaluation mapper (test-time harmonization); boxes are scaled into its output size.
    Each image goes through the backbone once, however many of its boxes are listed, in batches of up to
    ``batch_size`` images of the same size (so no image is padded more than alone: the result is the
    one-image-at-a-time result). ``embed(features, boxes)`` gives the features (default: the prototype head's
    ``embed_boxes``).
    """
    embed = embed or model.roi_heads.embed_boxes
    by_image: dict[int, list[int]] = {}
    for n, (d, _) in enumerate(picks):
        by_image.setdefault(id(d), []).append(n)
    by_size: dict[tuple, list[tuple[list[int], dict, torch.Tensor]]] = {}
    for group in by_image.values():
        d = picks[group[0]][0]
        mapped = mapper(dict(d))
        sy, sx = mapped["image"].shape[1] / d["height"], mapped["image"].shape[2] / d["width"]
        anns = [d["annotations"][picks[n][1]] for n in group]
        boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
                             dtype=torch.float32) * torch.tensor([sx, sy, sx, sy])
        by_size.setdefault(tuple(mapped["image"].shape), []).append((group, mapped, boxes))
    batches = [items[i:i + batch_size] for items in by_size.values() for i in range(0, len(items), batch_size)]
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"embedding boxes ({batch_size} images a batch)", unit="batch")
    was_training = model.training
    model.eval()
    out: torch.Tensor | None = None
    with torch.no_grad():
        for batch in batches:
            images = model.preprocess_image([mapped for _, mapped, _ in batch])
            features = model.backbone(images.tensor)
            z = embed(features, [Boxes(boxes.to(images.tensor.device)) for _, _, boxes in batch]).cpu()
            if out is None:
                out = torch.zeros(len(picks), z.shape[1])
            out[[n for group, _, _ in batch for n in group]] = z
    model.train(was_training)
    return out if out is not None else torch.zeros(0, 0)


def build_prototypes(model, dataset_dicts: list[dict], class_names: list[str], mapper, shots: int, seed: int,
                     progress: bool = False, embed=None) -> PrototypeSet:
    """Prototypes (class means of support embeddings) from K seeded support instances per class; ``embed`` as
    in :func:`embed_instances`."""
    picks = sample_support(dataset_dicts, len(class_names), shots, seed)
    embeddings = embed_instances(model, picks, mapper, progress, embed)
    labels = torch.tensor([d["annotations"][i]["category_id"] for d, i in picks])
    protos = torch.stack([embeddings[labels == c].mean(0) for c in range(len(class_names))])
    support = [{"class": class_names[d["annotations"][i]["category_id"]], "image_key": str(d.get("image_key", d["image_id"])),
                "file_name": d["file_name"], "bbox": [float(v) for v in d["annotations"][i]["bbox"]]} for d, i in picks]
    return PrototypeSet(list(class_names), protos, shots, seed, support,
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def calibrated_model(model, cfg: CfgNode, support_dicts: list[dict], support_classes: list[str], shots: int,
                     seed: int, model_classes: list[str], alpha: float):
    """``model`` wrapped for PCB (:class:`~steel_fsd.modeling.calibration.CalibratedRCNN`): prototypes are the
    mean box features of the K seeded supports per class of ``support_dicts``, ordered as ``model_classes``
    (classes without supports keep their scores)."""
    from ..modeling.calibration import CalibratedRCNN, box_features

    ps = build_prototypes(model, support_dicts, support_classes, SteelDatasetMapper(cfg, is_train=False), shots, seed,
                          embed=lambda f, b: box_features(model.roi_heads, f, b))
    protos = torch.full((len(model_classes), ps.embed_dim), float("nan"))
    for name, mu in zip(ps.class_names, ps.prototypes):
        if name in model_classes:
            protos[model_classes.index(name)] = mu
    return CalibratedRCNN(model, protos, alpha)
