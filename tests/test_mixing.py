"""Mosaic, copy-paste and multi-scale training: boxes and pixels against hand-computed references, the visibility
rule, masks moved with their defects, and a training run with all of them on."""
import numpy as np
import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from steel_fsd.data.mixing import MixingMapper, copy_paste, mosaic
from steel_fsd.engine.setup import build_config


def _item(value: int, boxes, classes, h=40, w=60, masks=False):
    img = torch.full((1, h, w), value, dtype=torch.uint8)
    img[0, 0, 0] = value + 1  # a marker at the corner
    inst = Instances((h, w), gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4)),
                     gt_classes=torch.tensor(classes, dtype=torch.int64))
    if masks:
        m = torch.zeros((len(boxes), h, w), dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            m[k, int(y0):int(y1), int(x0):int(x1)] = True
        inst.gt_masks = BitMasks(m)
    return {"file_name": f"{value}.png", "image": img, "instances": inst}


def test_mosaic_places_four_images_and_cuts_boxes_by_the_visibility_rule():
    h, w = 40, 60
    items = [_item(10, [[5, 5, 25, 25]], [0]), _item(20, [[30, 10, 50, 30]], [1]),
             _item(30, [[2, 2, 12, 12]], [2]), _item(40, [[40, 30, 60, 40]], [3])]
    # window centred at (60, 40): exactly the canvas's middle, x 30..90, y 20..60
    out = mosaic(items, (60.0, 40.0), min_visible=0.3)
    img = out["image"][0]
    assert img.shape == (h, w) and out["file_name"] == "10.png"
    # each quadrant of the window shows the matching image: top-left is item 0's x 30..60, y 20..40
    # (window pixel (20, 30) is canvas (40, 60): item 3's corner marker, 41)
    assert int(img[0, 0]) == 10 and int(img[0, 30]) == 20 and int(img[20, 0]) == 30 and int(img[21, 31]) == 40
    assert int(img[20, 30]) == 41
    # canvas boxes: item0 (5,5,25,25) is outside the window (x < 30): dropped; item1 (90,10,110,30) -> window
    # x 60..80 clipped to 60: width 0 -> dropped; item2 (2,42,12,52): x < 30 -> dropped; item3 (100,70,120,80)
    # -> (70,50,90,60) fully outside (x >= 60): dropped. Move the window to see boxes kept and clipped instead.
    assert len(out["instances"]) == 0
    out = mosaic(items, (40.0, 30.0), min_visible=0.3)  # window x 10..70, y 10..50
    got = {int(c): b.tolist() for b, c in zip(out["instances"].gt_boxes.tensor, out["instances"].gt_classes)}
    # item0 (5,5,25,25) -> (-5,-5,15,15): 15x15 of 20x20 visible (56%) -> kept, clipped to (0,0,15,15)
    # item1 (90,10,110,30) -> (80,0,100,20): outside -> dropped
    # item2 (2,42,12,52) -> (-8,32,2,42): 2x8 of 10x10 visible (16%) -> dropped
    # item3 (100,70,120,80) -> (90,60,110,70): outside -> dropped
    assert got == {0: [0.0, 0.0, 15.0, 15.0]}
    out = mosaic(items, (40.0, 30.0), min_visible=0.1)  # item2's 16% now suffices
    assert sorted(int(c) for c in out["instances"].gt_classes) == [0, 2]
    with pytest.raises(ValueError, match="4 images"):
        mosaic(items[:3], (40.0, 30.0))


def test_mosaic_moves_bitmasks_with_the_boxes_and_resizes_other_sizes():
    items = [_item(10, [[5, 5, 25, 25]], [0], masks=True)] + [
        _item(20 + 10 * k, [[10, 10, 20, 20]], [k + 1], h=80, w=120, masks=True) for k in range(3)]
    out = mosaic(items, (40.0, 30.0), min_visible=0.0)  # window x 10..70, y 10..50
    inst = out["instances"]
    for b, m in zip(inst.gt_boxes.tensor, inst.gt_masks.tensor):
        x0, y0, x1, y1 = (int(v) for v in b.tolist())
        assert m.sum() == (x1 - x0) * (y1 - y0) and m[y0:y1, x0:x1].all()  # the mask fills its box
    # items 1-3 were 120x80: halved to 60x40, their box (10,10,20,20) -> (5,5,10,10). Item 1 -> canvas
    # (65,5,70,10) -> window (55,-5,60,0): zero height, dropped; item 2 -> (5,45,10,50) -> (-5,35,0,40): dropped;
    # item 3 -> (65,45,70,50) -> (55,35,60,40): inside, kept
    assert sorted(int(c) for c in inst.gt_classes) == [0, 3]
    assert inst.gt_boxes.tensor[inst.gt_classes == 3].tolist() == [[55.0, 35.0, 60.0, 40.0]]
    mixed = mosaic([_item(10, [[5, 5, 25, 25]], [0])] + items[1:], (40.0, 30.0), min_visible=0.0)
    assert not mixed["instances"].has("gt_masks") and len(mixed["instances"]) == 2  # a box-only image among them
    target = _item(10, [[0, 0, 5, 5]], [0])
    assert copy_paste(target, items[1], 2, np.random.default_rng(0)) is target  # box-only and mask image: nothing
    polys = _item(10, [[5, 5, 25, 25]], [0])
    polys["instances"].gt_masks = PolygonMasks([[np.array([5, 5, 25, 5, 25, 25], dtype=np.float64)]])
    with pytest.raises(ValueError, match="bitmask"):
        mosaic([polys] + items[1:], (40.0, 30.0))


@pytest.mark.parametrize("with_masks", [False, True])
def test_copy_paste_puts_the_donors_defect_pixels_in_a_free_place(with_masks):
    target = _item(10, [[0, 0, 30, 20]], [0], masks=with_masks)
    donor = _item(200, [[40, 10, 50, 30]], [3], masks=with_masks)
    donor["image"][0, 10:30, 40:50] = torch.arange(200).view(20, 10).to(torch.uint8)  # a textured defect
    if with_masks:  # the donor's mask is the left half of its box: only those pixels move
        donor["instances"].gt_masks.tensor[0, 10:30, 45:50] = False
    out = copy_paste(target, donor, 3, np.random.default_rng(0))
    inst = out["instances"]
    assert len(inst) == 2 and inst.gt_classes.tolist() == [0, 3]
    x0, y0, x1, y1 = (int(v) for v in inst.gt_boxes.tensor[1].tolist())
    assert (x1 - x0, y1 - y0) == (10, 20)
    assert not (x0 < 30 and y0 < 20)  # no overlap with the target's own defect (0,0,30,20)
    pasted, src = out["image"][0, y0:y1, x0:x1], donor["image"][0, 10:30, 40:50]
    if with_masks:
        assert torch.equal(pasted[:, :5], src[:, :5]) and (pasted[:, 5:] == 10).all()
        assert torch.equal(inst.gt_masks.tensor[1, y0:y1, x0:x0 + 5], torch.ones(20, 5, dtype=torch.bool))
        assert int(inst.gt_masks.tensor[1].sum()) == 100
    else:
        assert torch.equal(pasted, src)
    assert torch.equal(target["image"][0, 5:, 35:], torch.full_like(target["image"][0, 5:, 35:], 10))  # input intact
    # a donor defect larger than the target cannot be placed: nothing pasted
    big = _item(50, [[0, 0, 60, 40]], [1])
    assert len(copy_paste(_item(10, [[0, 0, 5, 5]], [0]), big, 1, np.random.default_rng(0))["instances"]) == 1


def test_multi_scale_draws_train_sizes_and_leaves_test_time_alone():
    from detectron2.data import transforms as T

    from steel_fsd.data.transforms import RandomSquareResize, build_augmentations

    cfg = build_config("configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml",
                       ["INPUT.AUG.SCALES", "[160, 240]", "INPUT.AUG.ROTATION", "False", "INPUT.AUG.CROP", "False"])
    train = [a for a in build_augmentations(cfg, True) if isinstance(a, RandomSquareResize)]
    assert len(train) == 1
    np.random.seed(0)
    sizes = {train[0].get_transform(np.zeros((200, 300, 3), np.uint8)).new_h for _ in range(40)}
    assert sizes == {160, 240}
    test = build_augmentations(cfg, False)
    assert not any(isinstance(a, RandomSquareResize) for a in test)
    assert [a.new_h if hasattr(a, "new_h") else a.shape for a in test if isinstance(a, T.Resize)] == [(200, 200)]
    longest = RandomSquareResize([100], longest=True).get_transform(np.zeros((50, 400, 3), np.uint8))
    assert (longest.new_h, longest.new_w) == (13, 100)  # the aspect ratio kept, the long side at the drawn size
    with pytest.raises(ValueError, match="SCALES"):
        build_augmentations(build_config("configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml",
                                         ["INPUT.AUG.SCALES", "[0]"]), True)


def test_mixing_mapper_probabilities_and_checks():
    calls = []

    def mapper(d):
        calls.append(d["k"])
        return _item(d["k"], [[1, 1, 9, 9]], [d["k"] % 3])

    dicts = [{"k": k} for k in range(5)]
    cfg = build_config("configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml",
                       ["INPUT.AUG.MOSAIC_PROB", "1.0", "INPUT.AUG.COPY_PASTE_PROB", "0.0"])
    np.random.seed(1)
    out = MixingMapper(cfg, mapper, dicts)(dicts[0])
    assert len(calls) == 4 and out["image"].shape == (1, 40, 60)  # itself and three others, one mosaic
    cfg.defrost()
    cfg.INPUT.AUG.MOSAIC_PROB, cfg.INPUT.AUG.COPY_PASTE_PROB = 0.0, 1.0
    calls.clear()
    out = MixingMapper(cfg, mapper, dicts)(dicts[0])
    assert len(calls) == 2 and len(out["instances"]) == 2  # one donor, its one defect pasted
    cfg.INPUT.AUG.MOSAIC_PROB = 1.5
    with pytest.raises(ValueError, match="MOSAIC_PROB"):
        MixingMapper(cfg, mapper, dicts)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml",
                                    "configs/demo/proto_R18_FPN_synth_neu.yaml"])
def test_training_runs_with_mosaic_copy_paste_and_scales(config, tmp_path):
    from steel_fsd.data import register_neu
    from steel_fsd.engine.setup import finalize_config
    from steel_fsd.engine.trainer import Trainer
    from steel_fsd.synthetic import make_neu_synthetic
    from detectron2.data import DatasetCatalog

    if "t_mix_train" not in DatasetCatalog.list():
        make_neu_synthetic(tmp_path / "neu", n_per_class=2, seed=0)
        register_neu("t_mix_train", tmp_path / "neu", split=None)
    cfg = build_config(config, ["MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('t_mix_train',)", "DATASETS.TEST", "()",
                                "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "4", "INPUT.HARMONIZE.RESIZE", "96",
                                "INPUT.AUG.SCALES", "[80, 96]", "INPUT.AUG.MOSAIC_PROB", "1.0",
                                "INPUT.AUG.COPY_PASTE_PROB", "1.0", "DATALOADER.NUM_WORKERS", "0",
                                "OUTPUT_DIR", str(tmp_path / "o"), "TEST.EVAL_PERIOD", "0",
                                "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "4"])
    finalize_config(cfg)
    loader = iter(Trainer.build_train_loader(cfg))
    batch = next(loader)
    assert len(batch) == 4 and all(len(b["instances"]) >= 1 for b in batch)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert (tmp_path / "o" / "model_final.pth").is_file()
