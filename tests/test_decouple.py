"""Gradient-decoupled layers (DecoupledRCNN): the gradient into the backbone is each branch's own gradient times
its factor (checked against the branches' gradients taken separately), the forward pass equals GeneralizedRCNN
at the identity, and every reader of ROI features (support embeddings too) goes through the ROI layer."""
import copy
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from steel_fsd.engine.setup import build_config
from steel_fsd.modeling.decouple import DecoupledRCNN, scale_gradient

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml")
GDL = ["MODEL.META_ARCHITECTURE", "DecoupledRCNN", "INPUT.HARMONIZE.RESIZE", "96"]


def test_scale_gradient_is_the_identity_forward_and_scales_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = scale_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.arange(12.0).view(3, 4)).sum().backward()
    assert torch.allclose(x.grad, 0.25 * torch.arange(12.0).view(3, 4))
    x.grad = None
    scale_gradient(x, 0.0).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 4))


def _batch():
    g = torch.Generator().manual_seed(0)
    inst = Instances((96, 96), gt_boxes=Boxes(torch.tensor([[10.0, 10, 50, 60], [40, 50, 90, 80]])),
                     gt_classes=torch.tensor([2, 0]))
    return [{"image": (torch.rand(3, 96, 96, generator=g) * 255).to(torch.uint8), "instances": inst}]


def _backbone_grad(model, keys) -> torch.Tensor:
    model.zero_grad()
    torch.manual_seed(1)  # the RPN's and ROI heads' sampling draw the same every time
    with EventStorage():
        losses = model(_batch())
    sum(v for k, v in losses.items() if k in keys).backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.backbone.parameters()])


@pytest.mark.slow
def test_backbone_gradient_is_the_branch_gradients_times_their_factors():
    torch.manual_seed(0)
    model = build_model(build_config(CFG, GDL + ["MODEL.GDL.RPN_SCALE", "1.0", "MODEL.GDL.ROI_SCALE", "1.0"])).train()
    assert isinstance(model, DecoupledRCNN)
    rpn_keys, roi_keys = {"loss_rpn_cls", "loss_rpn_loc"}, {"loss_cls", "loss_box_reg"}
    g_rpn, g_roi = _backbone_grad(model, rpn_keys), _backbone_grad(model, roi_keys)
    assert g_rpn.abs().sum() > 0 and g_roi.abs().sum() > 0
    model.rpn_scale, model.roi_scale = 0.3, 0.75
    got = _backbone_grad(model, rpn_keys | roi_keys)
    assert torch.allclose(got, 0.3 * g_rpn + 0.75 * g_roi, rtol=1e-4, atol=1e-7)
    model.rpn_scale = model.roi_scale = 0.0  # both stopped: the backbone learns nothing, the heads still do
    assert _backbone_grad(model, rpn_keys | roi_keys).abs().sum() == 0
    assert model.roi_affine.weight.grad.abs().sum() > 0 and model.rpn_affine.weight.grad.abs().sum() > 0


def test_identity_layers_predict_as_the_plain_model_and_roi_readers_see_the_affine():
    torch.manual_seed(0)
    plain = build_model(build_config(CFG, ["INPUT.HARMONIZE.RESIZE", "96"])).eval()
    model = build_model(build_config(CFG, GDL)).eval()
    incompatible = model.load_state_dict(plain.state_dict(), strict=False)  # a plain checkpoint loads
    assert sorted(incompatible.missing_keys) == ["roi_affine.bias", "roi_affine.weight", "rpn_affine.bias",
                                                 "rpn_affine.weight"] and not incompatible.unexpected_keys
    batch = [{"image": b["image"]} for b in _batch()]
    with torch.no_grad():
        a, b = plain(batch)[0]["instances"], model(batch)[0]["instances"]
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.allclose(a.scores, b.scores)
    # the box pooler (training, inference, support embeddings and calibration all pool through it) reads
    # the ROI layer's output: ROIAlign is linear, so a weight of 2 doubles what it pools
    feats = model.backbone(model.preprocess_image(batch).tensor)
    x = [feats[f] for f in model.roi_heads.box_in_features]
    boxes = [Boxes(torch.tensor([[5.0, 5, 60, 70]]))]
    with torch.no_grad():
        base = model.roi_heads.box_pooler(x, boxes)
        model.roi_affine.weight.fill_(2.0)
        assert torch.allclose(model.roi_heads.box_pooler(x, boxes), 2 * base, atol=1e-5)
        # a deep copy (the EMA model) has its own layers: its hooks are its own
        twin = copy.deepcopy(model)
        twin.roi_affine.weight.fill_(3.0)
        assert torch.allclose(twin.roi_heads.box_pooler(x, boxes), 3 * base, atol=1e-5)
        assert torch.allclose(model.roi_heads.box_pooler(x, boxes), 2 * base, atol=1e-5)


def test_backbone_outputs_of_several_widths_are_refused():
    from detectron2.layers import ShapeSpec

    cfg = build_config(CFG, GDL)
    plain = build_model(build_config(CFG, ["INPUT.HARMONIZE.RESIZE", "96"]))
    kwargs = DecoupledRCNN.from_config(cfg)
    kwargs["backbone"] = plain.backbone
    plain.backbone.output_shape = lambda: {"p2": ShapeSpec(channels=256, stride=4), "p3": ShapeSpec(channels=128, stride=8)}
    with pytest.raises(ValueError, match="one width"):
        DecoupledRCNN(**kwargs)
    with pytest.raises(ValueError, match="RPN_SCALE -1.0"):
        build_model(build_config(CFG, GDL + ["MODEL.GDL.RPN_SCALE", "-1.0"]))
