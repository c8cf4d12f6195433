"""TFA's cosine classifier: scores against a brute-force reference, a stock checkpoint loading into it, and a
training step."""
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from steel_fsd.engine.setup import build_config
from steel_fsd.modeling.cosine_head import CosineOutputLayers, cosine_scores

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml")
COSINE = ["MODEL.ROI_HEADS.NAME", "CosineROIHeads", "MODEL.ROI_BOX_HEAD.COSINE_SCALE", "20.0"]


@pytest.mark.parametrize("seed", range(4))
def test_cosine_scores_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(7, 5, generator=g) * 3, torch.randn(4, 5, generator=g)
    got = cosine_scores(x, w, 20.0)
    for i in range(7):
        for c in range(4):
            a, b = x[i].double().numpy(), w[c].double().numpy()
            assert float(got[i, c]) == pytest.approx(20 * a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-4)
    assert got.abs().max() <= 20 + 1e-4  # bounded, whatever the feature or weight norms


def test_stock_checkpoint_loads_into_the_cosine_head_and_scores_are_cosines():
    torch.manual_seed(0)
    stock = build_model(build_config(CFG))
    cfg = build_config(CFG, COSINE)
    cos_model = build_model(cfg)
    incompatible = cos_model.load_state_dict(stock.state_dict(), strict=True)  # same parameter names and shapes
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    pred = cos_model.roi_heads.box_predictor
    assert isinstance(pred, CosineOutputLayers) and pred.cosine_scale == 20.0
    x = torch.randn(3, pred.cls_score.in_features)
    scores, deltas = pred(x)
    torch.testing.assert_close(scores, cosine_scores(x, stock.roi_heads.box_predictor.cls_score.weight, 20.0))
    torch.testing.assert_close(deltas, stock.roi_heads.box_predictor.bbox_pred(x))
    with pytest.raises(ValueError, match="COSINE_SCALE"):
        build_model(build_config(CFG, ["MODEL.ROI_HEADS.NAME", "CosineROIHeads", "MODEL.ROI_BOX_HEAD.COSINE_SCALE", "0"]))


def test_cosine_head_trains():
    cfg = build_config(CFG, COSINE + ["INPUT.HARMONIZE.RESIZE", "96"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    inst = Instances((96, 96), gt_boxes=Boxes(torch.tensor([[10.0, 10, 50, 60]])), gt_classes=torch.tensor([2]))
    batch = [{"image": (torch.rand(3, 96, 96) * 255).to(torch.uint8), "instances": inst}]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with EventStorage():
        losses = model(batch)
        assert set(losses) >= {"loss_cls", "loss_box_reg"} and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    opt.step()
