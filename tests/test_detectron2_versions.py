"""Behaviour that differs between Detectron2 v0.6 and main (the suite runs on both; see README)."""
import pytest
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform

from steel_fsd.engine.setup import build_config
from steel_fsd.modeling.prototype_heads import PrototypeOutputLayers

CFG = "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml"
MAIN_ONLY_OPTIONS = ["USE_SIGMOID_CE", "USE_FED_LOSS"]  # MODEL.ROI_BOX_HEAD keys added after v0.6


@pytest.mark.parametrize("option", MAIN_ONLY_OPTIONS)
def test_prototype_head_refuses_the_softmax_classifier_options_of_main(option):
    """They change the loss and probabilities of the softmax classifier that the prototype head replaces:
    refused, not silently ignored (checked on v0.6 too, where FastRCNNOutputLayers lacks them)."""
    with pytest.raises(ValueError, match=option):
        PrototypeOutputLayers(ShapeSpec(channels=16), box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
                              num_classes=3, embed_dim=8, **{option.lower(): True})


@pytest.mark.parametrize("option", MAIN_ONLY_OPTIONS)
def test_prototype_head_config_with_main_options(option):
    cfg = build_config(CFG, ["MODEL.ROI_HEADS.NAME", "PrototypeROIHeads"])
    if option not in cfg.MODEL.ROI_BOX_HEAD:
        pytest.skip(f"MODEL.ROI_BOX_HEAD.{option} does not exist in this Detectron2 (v0.6)")
    PrototypeOutputLayers(cfg, ShapeSpec(channels=16))  # False, the default: accepted
    cfg.defrost()
    cfg.MODEL.ROI_BOX_HEAD[option] = True
    with pytest.raises(ValueError, match=option):
        PrototypeOutputLayers(cfg, ShapeSpec(channels=16))
