"""Every config of the tree merges onto Detectron2's defaults + steel-fsd's keys and builds its model."""
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from steel_fsd.engine.setup import build_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
PROTOCOLS = sorted((ROOT / "protocols").glob("*.yaml"))  # tools/run_fewshot.py files, not Detectron2 configs
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p not in PROTOCOLS and not p.is_symlink())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1] if p.parent.name != "configs" else p.parent)))
def test_config_builds_its_model(path):
    cfg = build_config(str(path), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    # the model is the config's: classes, anchors per location, normalization, depth
    retina = cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    anchors = model.anchor_generator if retina else model.proposal_generator.anchor_generator
    assert anchors.num_anchors[0] == len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]) * len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])
    if retina:
        assert model.num_classes == cfg.MODEL.RETINANET.NUM_CLASSES
    else:
        assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
        if cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads":
            assert model.roi_heads.box_predictor.cls_score.out_features == cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1
    bottom_up = getattr(model.backbone, "bottom_up", model.backbone)
    norms = {type(m).__name__ for m in bottom_up.modules()}
    assert ("GroupNorm" in norms) == (cfg.MODEL.RESNETS.NORM == "GN"), norms
    blocks = sum(len(getattr(bottom_up, f"res{i}")) for i in range(2, 6) if hasattr(bottom_up, f"res{i}"))
    assert blocks == {18: 8, 34: 16, 50: 16, 101: 33}[cfg.MODEL.RESNETS.DEPTH] - (0 if hasattr(bottom_up, "res5") else
                                                                                 {18: 2, 50: 3}[cfg.MODEL.RESNETS.DEPTH])
    head = getattr(model, "roi_heads", None)
    if cfg.MODEL.ROI_HEADS.NAME == "PrototypeROIHeads":
        assert head.box_predictor.embed.out_features == cfg.MODEL.PROTOTYPE.EMBED_DIM
    if "R50" in path.name:
        assert cfg.MODEL.RESNETS.DEPTH == 50
    if "scratch" in path.name or "R18" in path.name or path.parent.name in ("demo", "ablations"):
        assert cfg.MODEL.WEIGHTS == ""
    model.eval()
    with torch.no_grad():  # one forward pass on a blank image
        out = model([{"image": torch.zeros(3, 128, 128), "height": 128, "width": 128}])
    assert "instances" in out[0]


@pytest.mark.parametrize("path", PROTOCOLS, ids=lambda p: p.name)
def test_protocol_file_is_valid(path):
    """Every protocol file parses; its model configs exist and build; its methods and variants name them."""
    from steel_fsd.fewshot.protocol import Protocol

    proto = Protocol(path)
    assert proto.settings and proto.methods and proto.shots and proto.seeds
    repo = ROOT.parent
    for name, cfg_file in proto.models.items():
        assert (repo / cfg_file).is_file(), f"{path.name}: model {name}: {cfg_file} not found"
        build_config(str(repo / cfg_file), proto.base_opts)  # every BASE_OPTS key exists in the config


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("paper, default, head_keys", [
    ("paper/faster_rcnn_R18_FPN_GN_neu_cpu.yaml", "baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml", {}),
    ("paper/proto_R18_FPN_GN_neu_cpu.yaml", "prototype/proto_R18_FPN_GN_neu_cpu.yaml",
     {"MODEL.PROTOTYPE.LOGIT": ("distance", "factorized"), "MODEL.PROTOTYPE.EMBED_NORM": ("", "BN"),
      "MODEL.PROTOTYPE.TRIPLET_WEIGHT": (1.0, 0.1)}),
])
def test_paper_config_differs_from_the_default_only_in_the_recipe(paper, default, head_keys):
    """configs/paper/ keeps the paper's recipe (every augmentation on, 1,000 iterations, the paper's head)
    reproducible; the measured defaults differ from it in those keys and nowhere else."""
    a, b = _flat(build_config(str(ROOT / paper))), _flat(build_config(str(ROOT / default)))
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    expected = {"INPUT.AUG.ROTATION": (True, False), "INPUT.AUG.CROP": (True, False),
                "INPUT.AUG.GAMMA": (True, False), "INPUT.AUG.NOISE": (True, False),
                "SOLVER.MAX_ITER": (1000, 2500), "SOLVER.STEPS": ((750, 900), (1875, 2250)),
                "SOLVER.CHECKPOINT_PERIOD": (300, 625), **head_keys}
    diff.pop("OUTPUT_DIR")
    assert diff == expected
    assert a["INPUT.HARMONIZE.CLAHE"] and a["INPUT.HARMONIZE.NORMALIZE"] and a["INPUT.AUG.HFLIP"] and a["INPUT.AUG.VFLIP"]


HEAD_KEYS = {"MODEL.ROI_HEADS.NAME", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "DATALOADER.SAMPLER_TRAIN",
             "DATALOADER.EPISODE_CLASSES", "DATALOADER.EPISODE_IMAGES_PER_CLASS", "OUTPUT_DIR"}


@pytest.mark.parametrize("stock", sorted((ROOT / "baselines").glob("faster_rcnn_*.yaml")), ids=lambda p: p.name)
def test_every_stock_config_has_its_prototype_twin(stock):
    """Each stock Faster R-CNN config has a prototype config (configs/prototype/proto_<same name>.yaml) that
    differs from it only in the head and the episodic sampler."""
    twin = ROOT / "prototype" / stock.name.replace("faster_rcnn_", "proto_")
    assert twin.is_file(), f"no prototype config {twin.name} for {stock.name}"
    a, b = _flat(build_config(str(stock))), _flat(build_config(str(twin)))
    assert {k for k in a if a[k] != b[k]} <= HEAD_KEYS
    assert b["MODEL.ROI_HEADS.NAME"] == "PrototypeROIHeads" and b["DATALOADER.SAMPLER_TRAIN"] == "EpisodicClassSampler"
