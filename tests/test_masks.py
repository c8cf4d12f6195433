"""Instance masks on mixed data: the mask loss counts only images with masks (against Detectron2's loss on
those images alone), the mapper keeps an image's masks only when every box has one, and a mask model trains on a
batch mixing masked and box-only images and is evaluated with segm AP beside bbox AP."""
import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
from detectron2.utils.events import EventStorage
from PIL import Image

from steel_fsd.data.mapper import masks_all_or_none
from steel_fsd.modeling.mask_head import PartialMaskRCNNHead

CFG = "configs/demo/proto_R18_FPN_synth_neu.yaml"


def _proposals(n: int, with_masks: bool, seed: int) -> Instances:
    g = torch.Generator().manual_seed(seed)
    inst = Instances((64, 64))
    xy = torch.rand(n, 2, generator=g) * 30
    inst.proposal_boxes = Boxes(torch.cat([xy, xy + 20], dim=1))
    inst.gt_classes = torch.zeros(n, dtype=torch.long)
    if with_masks:
        inst.gt_masks = BitMasks(torch.rand(n, 64, 64, generator=g) > 0.5)
    return inst


def test_mask_loss_counts_only_the_images_with_masks():
    torch.manual_seed(0)
    head = PartialMaskRCNNHead(ShapeSpec(channels=8, width=14, height=14), num_classes=1, conv_dims=[8, 8])
    head.train()
    a, b, c = _proposals(3, True, 0), _proposals(4, False, 1), _proposals(2, True, 2)
    x = torch.randn(9, 8, 14, 14)
    with EventStorage(0):  # mask_rcnn_loss logs its accuracy
        got = head(x, [a, b, c])["loss_mask"]
        logits = head.layers(x)
        want = mask_rcnn_loss(torch.cat([logits[:3], logits[7:]]), [a, c])  # Detectron2's loss on those images
        none = head(x[3:7], [b])["loss_mask"]  # a batch of box-only images: zero, still in the graph
    torch.testing.assert_close(got, want)
    got.backward()
    assert head.predictor.weight.grad is not None and head.predictor.weight.grad.abs().sum() > 0
    assert float(none) == 0.0 and none.requires_grad


def test_polygons_rasterize_to_the_pixels_they_enclose():
    from pycocotools import mask as mask_util

    from steel_fsd.data.mapper import polygons_to_rle

    m = mask_util.decode(polygons_to_rle([[2, 3, 12, 3, 12, 9, 2, 9]], 16, 20))  # a 10 x 6 rectangle
    assert m.shape == (16, 20) and m.sum() == 60 and m[3:9, 2:12].all()


def test_an_image_keeps_its_masks_only_when_every_box_has_one():
    full = [{"bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 4, 0, 4, 4]]}, {"bbox": [1, 1, 3, 3], "segmentation": [[1, 1, 3, 1, 3, 3]]}]
    assert masks_all_or_none(full) == full
    part = [full[0], {"bbox": [1, 1, 3, 3]}]
    assert all("segmentation" not in a for a in masks_all_or_none(part))
    assert masks_all_or_none([{"bbox": [0, 0, 1, 1]}]) == [{"bbox": [0, 0, 1, 1]}]


def _mixed_dataset(root, name: str) -> None:
    """Square defects of one class: half the images with polygon masks, half box-only."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    dicts = []
    for i in range(8):
        img = rng.normal(150, 10, (96, 96)).clip(0, 255)
        x0, y0 = (int(v) for v in rng.integers(10, 50, 2))
        img[y0:y0 + 30, x0:x0 + 30] = 40
        Image.fromarray(img.astype(np.uint8)).convert("RGB").save(root / f"m{i}.png")
        ann = {"bbox": [x0, y0, x0 + 30, y0 + 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0}
        if i % 2 == 0:
            ann["segmentation"] = [[x0, y0, x0 + 30, y0, x0 + 30, y0 + 30, x0, y0 + 30]]
        dicts.append({"file_name": str(root / f"m{i}.png"), "image_id": i + 1, "image_key": f"m{i}", "height": 96,
                      "width": 96, "annotations": [ann]})
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(name).set(thing_classes=["square"], evaluator_type="coco")


@pytest.mark.slow
def test_a_mask_model_trains_on_mixed_batches_and_reports_segm_ap(tmp_path):
    from steel_fsd.engine.setup import build_config, finalize_config
    from steel_fsd.engine.trainer import Trainer

    _mixed_dataset(tmp_path / "imgs", "t_mask_mixed")
    cfg = build_config(CFG, ["MODEL.MASK_ON", "True", "INPUT.MASK_FORMAT", "bitmask", "MODEL.ROI_MASK_HEAD.NAME", "PartialMaskRCNNHead",
                             "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "True", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
                             "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_HEADS.NUM_CLASSES", "1",
                             "DATASETS.TRAIN", "('t_mask_mixed',)", "DATASETS.TEST", "('t_mask_mixed',)",
                             "DATALOADER.SAMPLER_TRAIN", "TrainingSampler", "SOLVER.IMS_PER_BATCH", "4",
                             "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
                             "INPUT.HARMONIZE.RESIZE", "96", "DATALOADER.NUM_WORKERS", "0",
                             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "INPUT.HARMONIZE.NORMALIZE", "False",
                             "OUTPUT_DIR", str(tmp_path / "out"), "SEED", "0"])
    finalize_config(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()["t_mask_mixed"]
    losses = [json.loads(line) for line in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    mask_losses = [r["loss_mask"] for r in losses if "loss_mask" in r]
    assert mask_losses and all(np.isfinite(mask_losses)) and max(mask_losses) > 0
    assert "segm" in results and "bbox" in results and 0.0 <= results["segm"]["AP"] <= 100.0
    from steel_fsd.evaluation.coco import SteelCOCOEvaluator

    assert len(SteelCOCOEvaluator("t_mask_mixed").images_with_masks()) == 4  # segm AP on the masked half
