"""Few-shot segmentation: pooling, similarity and IoU against brute-force references, masks from dataset dicts,
folds that never show the novel class, and episodic training and fold evaluation end to end on small data."""
import math

import numpy as np
import pytest
import torch

from steel_fsd.data.segmentation import class_masks, fold_split, images_by_class, sample_supports
from steel_fsd.evaluation.segmentation import SegmentationScores
from steel_fsd.modeling.fewshot_seg import (context_prototype, cosine_map, distill_loss, masked_average_pool,
                                            response_weighted_pool)

CFG = "configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml"


def test_masked_average_pool_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    feat, mask = torch.randn(2, 3, 4, 5, generator=g), torch.rand(2, 4, 5, generator=g)
    out = masked_average_pool(feat, mask)
    for n in range(2):
        num = sum(feat[n, :, y, x] * mask[n, y, x] for y in range(4) for x in range(5))
        assert torch.allclose(out[n], num / mask[n].sum(), atol=1e-5)


def test_response_weighted_pool_matches_its_definition_and_downweights_an_outlier():
    g = torch.Generator().manual_seed(1)
    feat, mask = torch.randn(1, 4, 3, 3, generator=g), (torch.rand(1, 3, 3, generator=g) > 0.3).float()
    f = feat[0].reshape(4, -1).double()
    m = mask[0].reshape(-1).double()
    plain = (f * m).sum(1) / m.sum()
    cos = (f * plain[:, None]).sum(0) / (f.norm(dim=0) * plain.norm())
    w = m * torch.exp(cos / 0.1)
    ref = (f * w).sum(1) / w.sum()
    assert torch.allclose(response_weighted_pool(feat, mask)[0].double(), ref, atol=1e-5)
    # nine pixels of one defect feature and one pixel pointing elsewhere: the outlier weighs less than in the mean
    feat = torch.zeros(1, 2, 1, 10)
    feat[0, 0, 0, :9], feat[0, 1, 0, 9] = 1.0, 1.0
    full = torch.ones(1, 1, 10)
    assert response_weighted_pool(feat, full)[0, 1] < masked_average_pool(feat, full)[0, 1] / 10


def test_cosine_map_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    feat, proto = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, generator=g)
    out = cosine_map(feat, proto)
    for y in range(2):
        for x in range(2):
            v = feat[0, :, y, x]
            assert out[0, y, x] == pytest.approx(float(v @ proto[0] / (v.norm() * proto[0].norm())), abs=1e-5)


def test_context_prototype_matches_a_loop_and_moves_toward_the_querys_defect():
    g = torch.Generator().manual_seed(4)
    feat, proto = torch.randn(2, 3, 3, 4, generator=g), torch.randn(2, 3, generator=g)
    out = context_prototype(feat, proto)
    for n in range(2):
        pix = [feat[n, :, y, x].double() for y in range(3) for x in range(4)]
        w = torch.tensor([math.exp(float(v @ proto[n].double() / (v.norm() * proto[n].double().norm())) / 0.1)
                          for v in pix], dtype=torch.float64)
        ref = sum(wi * v for wi, v in zip(w / w.sum(), pix))
        assert torch.allclose(out[n].double(), ref, atol=1e-5)
    # a query whose defect pixels point at (1, 0.5) while the support prototype is (1, 0): the context
    # prototype is near the query's defect, not its background (0, 1)
    q = torch.zeros(1, 2, 4, 4)
    q[0, 1] = 1.0
    q[0, :, :2, :2] = torch.tensor([1.0, 0.5])[:, None, None]
    c = context_prototype(q, torch.tensor([[1.0, 0.0]]))[0]
    assert torch.allclose(c, torch.tensor([1.0, 0.5]), atol=0.05)


def test_distill_loss_matches_kl_by_hand_and_is_zero_when_levels_agree():
    g = torch.Generator().manual_seed(5)
    final = torch.randn(2, 4, 4, generator=g)
    level = torch.rand(2, 4, 4, generator=g) * 2 - 1  # cosine maps at the final size
    got = distill_loss([level], final, temperature=0.5)
    ref = 0.0
    for n in range(2):
        t = torch.softmax(final[n].flatten().double(), 0)
        s = torch.softmax(level[n].flatten().double() / 0.5, 0)
        ref += float((t * (t.log() - s.log())).sum()) / 2
    assert float(got) == pytest.approx(ref, rel=1e-4)
    assert float(distill_loss([final * 0.5], final, temperature=0.5)) == pytest.approx(0.0, abs=1e-6)
    # two levels: the mean of each level's loss; a coarse level is upsampled to the final size first
    coarse = torch.rand(2, 2, 2, generator=g)
    both = distill_loss([level, coarse], final, temperature=0.5)
    assert float(both) == pytest.approx((float(got) + float(distill_loss([coarse], final, temperature=0.5))) / 2,
                                        rel=1e-5)


def test_memory_leaves_out_the_episodes_class_and_wraps_around():
    from steel_fsd.engine.setup import build_config
    from steel_fsd.modeling.fewshot_seg import FewShotSegmenter

    cfg = build_config(CFG, ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32"])
    model = FewShotSegmenter(cfg, levels=("p2",), reduce_dim=32, hidden=32, memory=3)
    feat = torch.zeros(2, 32, 2, 2)
    feat[:, 0] = 1.0  # every query pixel points along e0
    assert torch.equal(model.memory_map(feat, "p2", None), torch.zeros(2, 2, 2))  # empty memory
    e = torch.eye(32)
    model.remember({"p2": (torch.stack([e[0], e[1]]), None)}, torch.tensor([0, 1]))
    # query of class 0: its own class's e0 is left out, e1 (orthogonal) remains -> 0; class 1: sees e0 -> 1
    got = model.memory_map(feat, "p2", torch.tensor([0, 1]))
    assert torch.allclose(got[0], torch.zeros(2, 2)) and torch.allclose(got[1], torch.ones(2, 2))
    assert torch.allclose(model.memory_map(feat, "p2", None), torch.ones(2, 2, 2))  # test time: every slot
    # two more prototypes fill slot 2 and overwrite slot 0 (first in, first out): e0 is gone
    model.remember({"p2": (-torch.stack([e[2], e[3]]), None)}, torch.tensor([2, 3]))
    assert model.memory_classes.tolist() == [3, 1, 2]
    assert torch.allclose(model.memory_map(feat, "p2", None), torch.zeros(2, 2, 2))


def test_scores_pool_intersections_and_unions_over_queries():
    sc = SegmentationScores()
    t = np.zeros((4, 4), bool)
    t[:2, :2] = True  # 4 pixels
    p = np.zeros((4, 4), bool)
    p[:2, :3] = True  # 6 pixels, 4 shared
    sc.add("a", p, t)
    sc.add("a", np.zeros((4, 4), bool), t)  # a miss: union 4, intersection 0
    sc.add("b", t, t)
    s = sc.summary()
    assert s["per_class"]["a"] == pytest.approx(100 * 4 / 10) and s["per_class"]["b"] == pytest.approx(100)
    assert s["mIoU"] == pytest.approx((40 + 100) / 2)
    fg = 100 * (4 + 0 + 4) / (6 + 4 + 4)
    bg = 100 * (10 + 12 + 12) / (12 + 16 + 12)  # background of the three queries: (~p & ~t) / (~p | ~t)
    assert s["FB-IoU"] == pytest.approx((fg + bg) / 2)
    again = SegmentationScores.from_state(sc.state())
    assert again.summary() == s
    with pytest.raises(ValueError, match="differ in size"):
        sc.add("a", np.zeros((3, 3), bool), t)
    assert math.isnan(SegmentationScores().summary()["mIoU"])


def _record(name, anns, h=20, w=30):
    return {"file_name": name, "height": h, "width": w, "annotations": anns}


def test_class_masks_from_polygons_and_rle_and_missing_masks_refused():
    from pycocotools import mask as mask_util

    square = [[2, 3, 12, 3, 12, 8, 2, 8]]  # x 2..12, y 3..8 (pixel edges): 10 x 5 pixels
    other = np.zeros((20, 30), np.uint8)
    other[10:15, 20:25] = 1
    rle = mask_util.encode(np.asfortranarray(other))
    rle["counts"] = rle["counts"].decode("ascii")
    masks = class_masks(_record("a.png", [{"category_id": 1, "segmentation": square},
                                          {"category_id": 1, "segmentation": rle},
                                          {"category_id": 0, "segmentation": rle}]))
    assert set(masks) == {0, 1}
    assert masks[1].sum() == 50 + 25 and masks[1][10:15, 20:25].all() and masks[1][3:8, 2:12].all()
    assert (masks[0] == other.astype(bool)).all()
    with pytest.raises(ValueError, match="b.png.*no mask"):
        class_masks(_record("b.png", [{"category_id": 0, "bbox": [0, 0, 1, 1]}]))


def test_folds_never_show_the_novel_class_and_supports_are_distinct():
    dicts = [_record(f"{i}.png", [{"category_id": c} for c in cs]) for i, cs in
             enumerate([[0], [1], [0, 2], [2], [1, 2], []])]
    assert images_by_class(dicts) == {0: [0, 2], 1: [1, 4], 2: [2, 3, 4]}
    base, excluded = fold_split(dicts, 2)
    assert excluded == [2, 3, 4] and base == {0: [0], 1: [1]}
    rng = np.random.default_rng(0)
    picks = sample_supports([5, 6, 7, 8], 3, rng, exclude=6)
    assert len(set(picks)) == 3 and 6 not in picks
    with pytest.raises(ValueError, match="3 support images asked for, 2 available"):
        sample_supports([1, 2], 3, rng)


def _square_dataset(n: int, seed: int) -> list[tuple]:
    """(image, {class: mask}) examples at 64 px: class 0 bright squares, class 1 dark squares, class 2 bright bars."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = i % 3
        img = torch.full((3, 64, 64), 0.0) + 0.1 * torch.as_tensor(rng.standard_normal((3, 64, 64)), dtype=torch.float32)
        y, x = (int(v) for v in rng.integers(4, 40, size=2))
        mask = torch.zeros(64, 64, dtype=torch.bool)
        if c == 2:
            mask[y:y + 4, 4:60] = True
        else:
            mask[y:y + 16, x:x + 16] = True
        img[:, mask] += 2.0 if c != 1 else -2.0
        out.append((img, {c: mask}))
    return out


@pytest.mark.slow
def test_episodic_training_lowers_the_loss_and_every_method_scores_the_novel_class():
    from steel_fsd.engine.setup import build_config
    from steel_fsd.fewshot.segmentation import METHODS, evaluate_fold, train_episodes
    from steel_fsd.modeling.fewshot_seg import FewShotSegmenter

    cfg = build_config(CFG, ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    torch.manual_seed(0)
    model = FewShotSegmenter(cfg, reduce_dim=32, hidden=32)
    train, test = _square_dataset(24, 0), _square_dataset(6, 1)
    base = {0: [i for i, (_, m) in enumerate(train) if 0 in m], 1: [i for i, (_, m) in enumerate(train) if 1 in m]}
    losses = train_episodes(model, train, base, steps=30, batch=2, lr=3e-3, seed=0, log_every=0)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert not model.training
    scores = evaluate_fold(model, train, test, novel=2, class_name="bar", shots=1, seeds=[0, 1],
                           thresholds=(0.3, 0.5))
    assert set(scores) == {(m, s, t) for m in METHODS for s in (0, 1) for t in (0.3, 0.5)}
    for sc in scores.values():
        s = sc.summary()
        assert set(s["per_class"]) == {"bar"} and 0.0 <= s["mIoU"] <= 100.0 and 0.0 <= s["FB-IoU"] <= 100.0
    for m in METHODS:  # a lower threshold marks a superset of the pixels: the union can only grow
        assert scores[(m, 0, 0.3)].state()["fg"]["bar"][1] >= scores[(m, 0, 0.5)].state()["fg"]["bar"][1]
    # the same seed draws the same supports: evaluation is repeatable
    again = evaluate_fold(model, train, test, novel=2, class_name="bar", shots=1, seeds=[0], methods=("panet",))
    assert again[("panet", 0, 0.5)].summary() == scores[("panet", 0, 0.5)].summary()


def test_segment_shares_one_backbone_pass_and_equals_the_models_forward():
    from steel_fsd.engine.setup import build_config
    from steel_fsd.fewshot.segmentation import segment
    from steel_fsd.modeling.fewshot_seg import FewShotSegmenter

    cfg = build_config(CFG, ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32"])
    torch.manual_seed(0)
    model = FewShotSegmenter(cfg, reduce_dim=32, hidden=32).eval()
    g = torch.Generator().manual_seed(3)
    support, masks = torch.randn(2, 3, 72, 60, generator=g), torch.rand(2, 72, 60, generator=g) > 0.7
    query = torch.randn(3, 3, 72, 60, generator=g)  # 72 x 60: padded to 96 x 64 inside, cut back
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    probs = segment(model, ["response", "average", "panet"], support, masks, query)
    assert len(calls) == 2  # the supports once, the queries once
    with torch.no_grad():
        for method, kw in (("response", {}), ("average", {"pooling": "average"}),
                           ("panet", {"decoder": False, "pooling": "average"})):
            ref = model(support[None].expand(3, -1, -1, -1, -1), masks[None].expand(3, -1, -1, -1).float(), query, **kw)
            assert probs[method].shape == (3, 72, 60)
            assert torch.allclose(probs[method], ref.softmax(1)[:, 1], atol=1e-5), method


def test_load_segmenter_round_trip_and_bad_files_name_the_file(tmp_path):
    from steel_fsd.engine.setup import build_config
    from steel_fsd.fewshot.segmentation import load_segmenter, save_segmenter
    from steel_fsd.modeling.fewshot_seg import FewShotSegmenter

    cfg = build_config(CFG, ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32"])
    torch.manual_seed(0)
    model = FewShotSegmenter(cfg, reduce_dim=32, hidden=32)
    path = str(tmp_path / "seg.pth")
    save_segmenter(path, model, trained_on=["spot"])
    loaded, meta = load_segmenter(cfg, path)
    assert meta["trained_on"] == ["spot"] and meta["pooling"] == model.pooling
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(ValueError, match=r"missing\.pth: weights file not found"):
        load_segmenter(cfg, str(tmp_path / "missing.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ValueError, match=r"text\.pth: not a weights file"):
        load_segmenter(cfg, str(tmp_path / "text.pth"))
    torch.save({"model": {}}, tmp_path / "detector.pth")
    with pytest.raises(ValueError, match=r"detector\.pth: not a segmenter file"):
        load_segmenter(cfg, str(tmp_path / "detector.pth"))
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")  # a pickled module: refused, not run
    with pytest.raises(ValueError, match=r"module\.pth: refused"):
        load_segmenter(cfg, str(tmp_path / "module.pth"))


@pytest.mark.slow
def test_switches_train_remember_base_classes_and_round_trip(tmp_path):
    """Context adaptation, memory and distillation on together: training fills the memory with base classes
    only, and the saved segmenter loads back with its switches and memory, predicting the same."""
    from steel_fsd.engine.setup import build_config
    from steel_fsd.fewshot.segmentation import load_segmenter, save_segmenter, segment, train_episodes
    from steel_fsd.modeling.fewshot_seg import FewShotSegmenter

    cfg = build_config(CFG, ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32"])
    torch.manual_seed(0)
    model = FewShotSegmenter(cfg, reduce_dim=32, hidden=32, context=True, memory=4)
    train = _square_dataset(12, 0)
    base = {0: [i for i, (_, m) in enumerate(train) if 0 in m], 1: [i for i, (_, m) in enumerate(train) if 1 in m]}
    losses = train_episodes(model, train, base, steps=4, batch=2, lr=1e-3, seed=0, log_every=0, distill=0.5)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert sorted(set(model.memory_classes.tolist())) <= [0, 1] and int(model.memory_next) == 8
    path = str(tmp_path / "seg.pth")
    save_segmenter(path, model)
    loaded, meta = load_segmenter(cfg, path)
    assert loaded.context and loaded.memory == 4 and meta["context"] is True
    assert torch.equal(loaded.memory_p3, model.memory_p3)
    img, masks = train[5]
    s, m = img[None], next(iter(masks.values()))[None]
    a = segment(model.eval(), ["response", "panet"], s, m, train[8][0][None])
    b = segment(loaded, ["response", "panet"], s, m, train[8][0][None])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
def test_frozen_backbone_trains_on_cached_features_with_the_same_first_loss():
    """With ``freeze_backbone`` the first step's loss equals the full model's on the same episodes (the cached
    features of the flipped images are the backbone's), the backbone stays as it was and the rest learns."""
    from steel_fsd.engine.setup import build_config
    from steel_fsd.fewshot.segmentation import train_episodes
    from steel_fsd.modeling.fewshot_seg import FewShotSegmenter

    cfg = build_config(CFG, ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32"])
    train = _square_dataset(8, 0)
    base = {0: [i for i, (_, m) in enumerate(train) if 0 in m], 1: [i for i, (_, m) in enumerate(train) if 1 in m]}
    runs = {}
    for frozen in (False, True):
        torch.manual_seed(0)
        model = FewShotSegmenter(cfg, reduce_dim=32, hidden=32)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        losses = train_episodes(model, train, base, steps=3, batch=2, shots=2, lr=1e-3, seed=0, log_every=0,
                                freeze_backbone=frozen)
        after = model.state_dict()
        moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
        runs[frozen] = (losses, moved)
    assert runs[True][0][0] == pytest.approx(runs[False][0][0], abs=1e-5)
    assert "backbone" in runs[False][1] and "backbone" not in runs[True][1]
    assert {"reduce", "decoder"} <= runs[True][1]
