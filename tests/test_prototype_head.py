"""Prototype head maths against brute-force references, and the head inside a Detectron2 model."""
import itertools

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from steel_fsd.engine.setup import build_config
from steel_fsd.modeling.losses import batch_hard_triplet_loss
from steel_fsd.modeling.prototype_heads import PrototypeOutputLayers, prototype_logits

CFG = "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml"


def brute_force_triplet(z: np.ndarray, y: np.ndarray, margin: float) -> float:
    """Enumerate every (anchor, positive, negative) triplet: O(n^3), float64."""
    per_anchor = []
    for a in range(len(z)):
        losses = [max(np.linalg.norm(z[a] - z[p]) - np.linalg.norm(z[a] - z[n]) + margin, 0.0)
                  for p, n in itertools.product(range(len(z)), repeat=2)
                  if p != a and y[p] == y[a] and y[n] != y[a]]
        if losses:
            per_anchor.append(max(losses))
    return float(np.mean(per_anchor)) if per_anchor else 0.0


@pytest.mark.parametrize("seed", range(8))
def test_batch_hard_triplet_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, d = rng.integers(4, 18), rng.integers(2, 9)
    z = rng.normal(size=(n, d))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    y = rng.integers(0, rng.integers(2, 5), size=n)
    y[rng.integers(n)] = y[0]  # make some positives likely; singletons still occur
    margin = float(rng.uniform(0.1, 1.0))
    got = batch_hard_triplet_loss(torch.tensor(z), torch.tensor(y), margin).item()
    assert got == pytest.approx(brute_force_triplet(z, y, margin), abs=1e-6)


def test_triplet_without_valid_anchor_is_zero_with_gradient():
    z = torch.nn.functional.normalize(torch.randn(3, 4, requires_grad=True), dim=1)
    loss = batch_hard_triplet_loss(z, torch.tensor([0, 1, 2]), 0.3)  # no positives anywhere
    assert loss.item() == 0.0
    loss.backward()


def test_prototype_logits_by_hand():
    rng = np.random.default_rng(0)
    z, mu, tau = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)), 7.5
    expected = np.array([[-tau * sum((z[i, k] - mu[c, k]) ** 2 for k in range(3)) for c in range(4)] for i in range(5)])
    got = prototype_logits(torch.tensor(z), torch.tensor(mu), torch.tensor(tau)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.fixture(scope="module")
def model():
    cfg = build_config(CFG, ["MODEL.ROI_HEADS.NAME", "PrototypeROIHeads", "MODEL.DEVICE", "cpu",
                             "MODEL.PROTOTYPE.EMBED_DIM", "32"])
    torch.manual_seed(0)
    return build_model(cfg)


def batch(n=2):
    torch.manual_seed(1)
    out = []
    for _ in range(n):
        inst = Instances((200, 200))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 10, 60, 40], [100, 100, 180, 190], [20, 120, 90, 180]]))
        inst.gt_classes = torch.tensor([0, 3, 0])
        out.append({"image": torch.randint(0, 255, (3, 200, 200)).float(), "instances": inst})
    return out


def test_head_is_registered_and_replaces_classifier(model):
    pred = model.roi_heads.box_predictor
    assert type(model.roi_heads).__name__ == "PrototypeROIHeads"
    assert isinstance(pred, PrototypeOutputLayers) and not hasattr(pred, "cls_score")
    assert pred.bbox_pred.out_features == 4  # class-agnostic regression
    assert "roi_heads.box_predictor.bank" in model.state_dict()


def test_training_step_losses_bank_and_unit_norm(model):
    model.train()
    pred = model.roi_heads.box_predictor
    with EventStorage() as storage:
        losses = model(batch())
        sum(losses.values()).backward()
        assert abs(storage.latest()["prototype/tau"][0] - pred.tau.item()) < 1e-6
    assert {"loss_cls", "loss_box_reg", "loss_triplet", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert pred.log_tau.grad is not None and pred.embed.weight.grad is not None
    assert pred.bank_filled.tolist() == [True, False, False, True, False, False]
    z = pred.embed_features(torch.randn(7, pred.embed.in_features))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(7))


def test_bank_ema_update_matches_formula():
    pred = PrototypeOutputLayers.__new__(PrototypeOutputLayers)
    torch.nn.Module.__init__(pred)
    pred.num_classes, pred.momentum = 3, 0.75
    pred.register_buffer("bank", torch.tensor([[1.0, 0], [0, 1], [0, 0]]))
    pred.register_buffer("bank_filled", torch.tensor([True, True, False]))
    z = torch.tensor([[0.0, 1], [1, 0], [0.6, 0.8], [1, 1]])
    gt = torch.tensor([0, 0, 2, 3])  # class 3 = background
    protos, available = pred.training_prototypes(z, gt)
    mean0 = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(protos[0], 0.75 * torch.tensor([1.0, 0]) + 0.25 * mean0)
    torch.testing.assert_close(protos[1], torch.tensor([0.0, 1]))  # absent: bank
    torch.testing.assert_close(protos[2], torch.tensor([0.6, 0.8]))  # first sighting: batch mean
    torch.testing.assert_close(pred.bank, protos)
    assert available.tolist() == [True, True, True]


def test_support_prototypes_change_the_class_set(model):
    model.eval()
    pred = model.roi_heads.box_predictor
    pred.set_support(torch.nn.functional.normalize(torch.randn(4, 32), dim=1), ["a", "b", "c", "d"])
    try:
        pred.test_score_thresh = 0.0
        with torch.no_grad():
            out = model([{"image": b["image"]} for b in batch(1)])[0]["instances"]
        assert len(out) > 0 and int(out.pred_classes.max()) <= 3
        with pytest.raises(ValueError, match="dim"):
            pred.set_support(torch.zeros(4, 16))
    finally:
        pred.set_support(None)
        pred.test_score_thresh = 0.05


@pytest.mark.parametrize("background", ["logit", "prototype"])
def test_head_logits_by_hand_for_both_background_kinds(background):
    cfg = build_config(CFG, ["MODEL.ROI_HEADS.NAME", "PrototypeROIHeads", "MODEL.PROTOTYPE.EMBED_DIM", "8",
                             "MODEL.PROTOTYPE.BACKGROUND", background])
    torch.manual_seed(0)
    from detectron2.layers import ShapeSpec
    head = PrototypeOutputLayers(cfg, ShapeSpec(channels=16))
    x = torch.randn(5, 16)
    feats, deltas = head(x)
    z, bg = head.split(feats)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    protos = torch.randn(6, 8)
    logits = head.logits(feats, protos)
    tau = head.tau.item()
    for i in range(5):
        for c in range(6):
            assert logits[i, c].item() == pytest.approx(-tau * float(((z[i] - protos[c]) ** 2).sum()), rel=1e-5)
        expected_bg = (head.bg_score(x[i:i + 1]).item() if background == "logit"
                       else -tau * float(((z[i] - head.bg_prototype) ** 2).sum()))
        assert logits[i, 6].item() == pytest.approx(expected_bg, rel=1e-5, abs=1e-6)
    assert deltas.shape == (5, 4)


def test_tau_is_projected_into_its_range(model):
    pred = model.roi_heads.box_predictor
    with torch.no_grad():
        pred.log_tau.fill_(10.0)  # tau = e^10, far above TAU_RANGE's 64
    model.train()
    with EventStorage():
        model(batch(1))
    assert pred.tau.item() == pytest.approx(64.0)
