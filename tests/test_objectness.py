"""Objectness-only boxes: the view moves boxes out of the annotations, the mapper makes them class -1 instances that
follow the transforms, the ROI heads' hook leaves them and the proposals on them out, the episodic sampler draws
their images, and a model trains on a class dataset beside an objectness view."""
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances

from steel_fsd.data.mapper import add_objectness_instances
from steel_fsd.data.objectness import OBJECTNESS_KEY, objectness_view
from steel_fsd.modeling.objectness import ignore_objectness_only


def test_view_moves_every_box_to_objectness_boxes():
    dicts = [{"file_name": "a", "annotations": [{"bbox": [10, 20, 30, 40], "bbox_mode": BoxMode.XYWH_ABS,
                                                  "category_id": 3, "segmentation": [[0, 0, 1, 1, 1, 0]]}]},
             {"file_name": "b", "annotations": []}]
    out = objectness_view(dicts)
    assert out[0]["annotations"] == [] and out[0][OBJECTNESS_KEY] == [[10.0, 20.0, 40.0, 60.0]]
    assert out[1][OBJECTNESS_KEY] == [] and dicts[0]["annotations"]  # the input is not changed


def test_mapper_adds_flipped_objectness_boxes_as_class_minus_one():
    inst = Instances((50, 100), gt_boxes=Boxes(torch.tensor([[1.0, 1, 5, 5]])), gt_classes=torch.tensor([2]))
    d = {"file_name": "x", "instances": inst, OBJECTNESS_KEY: [[10.0, 20.0, 40.0, 30.0], [95.0, 0.0, 130.0, 10.0]]}
    tfm = T.TransformList([T.HFlipTransform(100)])
    add_objectness_instances(d, tfm, (50, 100))
    got = d["instances"]
    assert got.gt_classes.tolist() == [2, -1, -1] and OBJECTNESS_KEY not in d
    # flipped: x -> 100 - x; the second box (95..130) -> (-30..5) clipped to (0..5)
    assert got.gt_boxes.tensor[1:].tolist() == [[60.0, 20.0, 90.0, 30.0], [0.0, 0.0, 5.0, 10.0]]
    d = {"file_name": "y", OBJECTNESS_KEY: [[0.0, 0.0, 0.0, 10.0]]}  # an empty box is dropped; no instances before
    add_objectness_instances(d, T.TransformList([]), (50, 100))
    assert len(d["instances"]) == 0


class _Recorder(torch.nn.Module):
    def forward(self, images, features, proposals, targets=None):
        self.seen = (proposals, targets)
        return proposals


def test_roi_hook_drops_objectness_targets_and_the_proposals_on_them():
    heads = _Recorder()
    handle = ignore_objectness_only(heads, 0.5)
    props = Instances((50, 100), proposal_boxes=Boxes(torch.tensor([[10.0, 10, 30, 30], [11, 11, 31, 31],
                                                                    [60, 10, 80, 30], [0, 0, 5, 5]])))
    targets = Instances((50, 100), gt_boxes=Boxes(torch.tensor([[10.0, 10, 30, 30], [60, 10, 80, 30]])),
                        gt_classes=torch.tensor([-1, 4]))
    heads(None, {}, [props], [targets])
    p, t = heads.seen
    # proposals 0 and 1 overlap the objectness box at IoU 1.0 and 0.82: out; 2 (on the class box) and 3 stay
    assert p[0].proposal_boxes.tensor.tolist() == [[60.0, 10, 80, 30], [0, 0, 5, 5]]
    assert t[0].gt_classes.tolist() == [4]
    heads(None, {}, [props], None)  # inference: untouched
    assert heads.seen[0][0] is props and heads.seen[1] is None
    handle.remove()


def test_episodic_sampler_draws_objectness_images_as_a_pseudo_class():
    from steel_fsd.data.episodic import EpisodicBatchSampler

    dicts = [{"annotations": [{"category_id": c}]} for c in (0, 1, 0, 1)] + \
        [{"annotations": [], OBJECTNESS_KEY: [[0, 0, 1, 1]]}, {"annotations": [], OBJECTNESS_KEY: []}]
    s = EpisodicBatchSampler(dicts, n_way=3, k_images=1, seed=0, rank=0, world_size=1)
    assert s.classes == [-1, 0, 1] and s.by_class[-1] == [4]  # the image without any box is in no pool
    batch = next(iter(s))
    assert 4 in batch and len(batch) == 3


@pytest.mark.slow
def test_training_beside_an_objectness_view(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from steel_fsd.data import register_neu, register_severstal
    from steel_fsd.data.objectness import register_objectness_view
    from steel_fsd.engine.setup import build_config, finalize_config
    from steel_fsd.engine.trainer import Trainer
    from steel_fsd.synthetic import make_neu_synthetic, make_severstal_synthetic

    make_neu_synthetic(tmp_path / "neu", n_per_class=2, seed=0)
    make_severstal_synthetic(tmp_path / "sev", n_images=4, seed=0)
    register_neu("t_obj_neu", tmp_path / "neu", split=None)
    register_severstal("t_obj_sev", tmp_path / "sev", split=None, tile=256)
    register_objectness_view("t_obj_view", "t_obj_sev", MetadataCatalog.get("t_obj_neu").thing_classes)
    view = DatasetCatalog.get("t_obj_view")
    assert sum(len(d[OBJECTNESS_KEY]) for d in view) > 0 and all(not d["annotations"] for d in view)
    cfg = build_config("configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml",
                       ["MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('t_obj_neu', 't_obj_view')", "DATASETS.TEST", "()",
                        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", "SOLVER.MAX_ITER", "3",
                        "SOLVER.IMS_PER_BATCH", "4", "INPUT.HARMONIZE.RESIZE", "96", "DATALOADER.NUM_WORKERS", "0",
                        "OUTPUT_DIR", str(tmp_path / "o"), "TEST.EVAL_PERIOD", "0",
                        "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "4"])
    finalize_config(cfg)
    trainer = Trainer(cfg)
    seen = {"rpn": 0, "roi": 0}
    rpn_pre = trainer.model.proposal_generator.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("rpn", seen["rpn"] + sum(int((t.gt_classes < 0).sum()) for t in a[2])))
    roi_classes = []
    orig = trainer.model.roi_heads.label_and_sample_proposals
    trainer.model.roi_heads.label_and_sample_proposals = lambda p, t: (
        roi_classes.extend(int(c) for x in t for c in x.gt_classes), orig(p, t))[1]
    trainer.resume_or_load(resume=False)
    trainer.train()
    rpn_pre.remove()
    assert seen["rpn"] > 0  # the RPN trained on objectness boxes
    assert roi_classes and min(roi_classes) >= 0  # the ROI heads never saw one
