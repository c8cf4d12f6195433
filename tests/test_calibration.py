"""Prototype calibration (PCB): rescoring against a brute-force reference, box features of stock and prototype
heads, and the wrapped model against the plain one."""
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes

from steel_fsd.engine.setup import build_config
from steel_fsd.modeling.calibration import CalibratedRCNN, box_features, calibrated_scores

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml")
PROTO_CFG = str(REPO / "configs/demo/proto_R18_FPN_synth_neu.yaml")


@pytest.mark.parametrize("seed", range(5))
def test_calibrated_scores_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, c, d, alpha = 12, 4, 8, 0.3 + 0.1 * seed
    scores, classes = torch.rand(n, generator=g), torch.randint(0, c, (n,), generator=g)
    feats, protos = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g)
    protos[2] = float("nan")  # a class without supports
    got = calibrated_scores(scores, classes, feats, protos, alpha)
    for i in range(n):
        k = int(classes[i])
        if k == 2:
            assert got[i] == scores[i]
            continue
        f, mu = feats[i].numpy().astype(float), protos[k].numpy().astype(float)
        cos = max(0.0, float(f @ mu / np.linalg.norm(f) / np.linalg.norm(mu)))
        assert float(got[i]) == pytest.approx(alpha * float(scores[i]) + (1 - alpha) * cos, abs=1e-6)


@pytest.fixture(scope="module", params=[CFG, PROTO_CFG], ids=["stock", "prototype"])
def model_and_inputs(request):
    cfg = build_config(request.param, ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.PROTOTYPE.EMBED_DIM", "16"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if request.param == PROTO_CFG:
        model.roi_heads.box_predictor.set_support(torch.nn.functional.normalize(torch.randn(6, 16), dim=1))
    inputs = [{"image": (torch.rand(3, 96, 96) * 255).to(torch.uint8), "height": 192, "width": 192}]
    return model, inputs


def test_box_features_are_what_the_head_sees_at_inference(model_and_inputs):
    """The features PCB compares are the ones the ROI head computes for the same boxes in its own inference:
    captured there by a hook (the stock head's box-head output, the prototype head's embeddings z)."""
    from detectron2.structures import Instances

    model, inputs = model_and_inputs
    seen = {}
    prototype = hasattr(model.roi_heads, "embed_boxes")
    module = model.roi_heads.box_predictor if prototype else model.roi_heads.box_head
    def capture(m, i, o) -> None:  # returning None keeps the module's output
        seen["out"] = o[0][0] if prototype else o

    hook = module.register_forward_hook(capture)
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        boxes = Boxes(torch.tensor([[4.0, 4, 40, 40], [10, 20, 90, 60], [0, 0, 96, 96]]))
        proposals = Instances(images.image_sizes[0], proposal_boxes=boxes, objectness_logits=torch.zeros(3))
        model.roi_heads(images, features, [proposals])
        hook.remove()
        f = box_features(model.roi_heads, features, [boxes])
    torch.testing.assert_close(f, seen["out"])
    assert len(f) == 3 and not torch.allclose(f[0], f[1])
    if prototype:
        torch.testing.assert_close(f.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_calibrated_model_keeps_boxes_and_rescores(model_and_inputs, alpha):
    model, inputs = model_and_inputs
    with torch.no_grad():
        plain = model(inputs)[0]["instances"]
        raw = model.inference(inputs, do_postprocess=False)[0]  # boxes in the model's input pixels
        features = model.backbone(model.preprocess_image(inputs).tensor)
        feats = box_features(model.roi_heads, features, [raw.pred_boxes])
    protos = torch.randn(6, feats.shape[1])
    wrapped = CalibratedRCNN(model, protos, alpha)(inputs)[0]["instances"]
    assert len(plain) > 0 and torch.equal(wrapped.pred_boxes.tensor, plain.pred_boxes.tensor)
    assert torch.equal(wrapped.pred_classes, plain.pred_classes) and wrapped.image_size == (192, 192)
    want = calibrated_scores(raw.scores, raw.pred_classes, feats, protos, alpha)
    torch.testing.assert_close(wrapped.scores, want)
    if alpha == 1.0:
        torch.testing.assert_close(wrapped.scores, plain.scores)
