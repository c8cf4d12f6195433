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
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 1e6
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
    from steel_fsd.engine.protocol import Protocol

    proto = Protocol(path)
    assert proto.settings and proto.methods and proto.shots and proto.seeds
    repo = ROOT.parent
    for name, cfg_file in proto.models.items():
        assert (repo / cfg_file).is_file(), f"{path.name}: model {name}: {cfg_file} not found"
        build_config(str(repo / cfg_file), proto.base_opts)  # every BASE_OPTS key exists in the config
