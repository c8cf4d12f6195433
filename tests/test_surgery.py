"""Checkpoint surgery (class-specific heads resized by class name) and parameter freezing, on real models."""
import functools
import json
import math

import pytest
from conftest import load_tool
import torch
import torch.distributed as dist
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.solver import build_optimizer

from steel_fsd.data import NEU_CLASSES, SEVERSTAL_CLASSES
from steel_fsd.engine.setup import build_config
from steel_fsd.modeling.freeze import freeze_parameters
from steel_fsd.modeling.checkpoint import UnsafeWeightsError, WeightsReadError
from steel_fsd.modeling.surgery import BANK, BBOX, RETINANET, SOFTMAX, resize_checkpoint, resize_state_dict
from steel_fsd.utils.cli import run_main

FASTER = "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml"
PROTO = "configs/demo/proto_R18_FPN_synth_neu.yaml"
RETINA = "configs/baselines/retinanet_R50_FPN_scratch_GN_neu.yaml"
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
NEU, BASE = list(NEU_CLASSES), list(NEU_CLASSES[:4])
PERMUTED = [NEU[5], NEU[2], NEU[0], NEU[4], NEU[3], NEU[1]]


def config(kind: str, num_classes: int):
    """A small CPU config of a Faster R-CNN ("faster"), prototype-head ("proto") or RetinaNet model."""
    n = str(num_classes)
    if kind == "retinanet":
        return build_config(RETINA, SMALL + ["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.RETINANET.NUM_CLASSES", n])
    extra = ["MODEL.PROTOTYPE.EMBED_DIM", "16"] if kind == "proto" else []
    return build_config(PROTO if kind == "proto" else FASTER, SMALL + extra + ["MODEL.ROI_HEADS.NUM_CLASSES", n])


def new_model(kind: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config(kind, num_classes))


@functools.lru_cache(maxsize=None)
def state(kind: str, num_classes: int) -> dict:
    """A trained-looking source state: random head rows, and a partly filled random prototype bank."""
    s = {k: v.clone() for k, v in new_model(kind, num_classes).state_dict().items()}
    if kind == "proto":
        s[BANK] = torch.nn.functional.normalize(torch.randn(s[BANK].shape), dim=1)
        s[BANK + "_filled"] = torch.arange(num_classes) % 3 != 1
    for k in (f"{SOFTMAX}.bias", f"{BBOX}.bias", f"{RETINANET}.bias"):
        if k in s and s[k].shape[0] > 4:
            s[k] = torch.randn(s[k].shape)  # Detectron2 initialises these constant: make copied rows traceable
    return s


def loads_strictly(kind: str, num_classes: int, new_state: dict) -> None:
    model = new_model(kind, num_classes)
    model.load_state_dict(new_state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, new_state[k]), k


def expected_rows(old: torch.Tensor, new_fill: torch.Tensor, src: list, tgt: list, per: int, groups: int = 1,
                  background: bool = False) -> torch.Tensor:
    """Brute force: row (g, target class j, r) = old row (g, source class i, r) when tgt[j] == src[i]."""
    out = new_fill.clone()
    for g in range(groups):
        for j, name in enumerate(tgt):
            if name in src:
                i = src.index(name)
                for r in range(per):
                    out[(g * len(tgt) + j) * per + r] = old[(g * len(src) + i) * per + r]
    if background:
        out[-1] = old[-1]
    return out


CASES = [(BASE, NEU), (BASE, PERMUTED), (NEU, list(SEVERSTAL_CLASSES)), (NEU, [NEU[4], NEU[1], "new_defect"])]


@pytest.mark.parametrize("src,tgt", CASES)
def test_softmax_head_rows_follow_class_names(src, tgt):
    old = state("faster", len(src))
    new, report = resize_state_dict(old, src, tgt, seed=3)
    fresh = [j for j, c in enumerate(tgt) if c not in src]
    assert report["copied"] == [c for c in tgt if c in src] and report["new"] == [tgt[j] for j in fresh]
    assert report["dropped"] == [c for c in src if c not in tgt]
    assert report["heads"] == ["softmax", "bbox_class_specific"]
    for name, per, bg in (("cls_score", 1, True), ("bbox_pred", 4, False)):
        for p in ("weight", "bias"):
            key = f"roi_heads.box_predictor.{name}.{p}"
            assert new[key].shape[0] == len(tgt) * per + bg
            assert torch.equal(new[key], expected_rows(old[key], new[key], src, tgt, per, background=bg)), key
    w, b = new[f"{SOFTMAX}.weight"], new[f"{SOFTMAX}.bias"]
    for j in fresh:  # Detectron2's init: N(0, 0.01) weights, zero bias; unlike any trained row
        assert b[j] == 0 and 0.005 < w[j].std() < 0.02
        assert not any(torch.equal(w[j], r) for r in old[f"{SOFTMAX}.weight"])
        rows = slice(4 * j, 4 * j + 4)
        assert (new[f"{BBOX}.bias"][rows] == 0).all() and 0.0005 < new[f"{BBOX}.weight"][rows].std() < 0.002
    untouched = [k for k in old if not k.startswith("roi_heads.box_predictor.")]
    assert all(new[k] is old[k] for k in untouched)
    loads_strictly("faster", len(tgt), new)


def test_new_rows_are_deterministic_per_seed_and_the_input_is_untouched():
    old = state("faster", 4)
    before = {k: v.clone() for k, v in old.items()}
    a, _ = resize_state_dict(old, BASE, NEU, seed=0)
    b, _ = resize_state_dict(old, BASE, NEU, seed=0)
    c, _ = resize_state_dict(old, BASE, NEU, seed=1)
    for key, per in ((f"{SOFTMAX}.weight", 1), (f"{BBOX}.weight", 4)):
        copied, fresh = slice(0, 4 * per), slice(4 * per, 6 * per)  # BASE is NEU's first four classes
        assert torch.equal(a[key], b[key]) and torch.equal(a[key][copied], c[key][copied])
        assert not torch.equal(a[key][fresh], c[key][fresh])
    assert all(torch.equal(v, before[k]) for k, v in old.items())


@pytest.mark.parametrize("src,tgt", CASES[:3])
def test_retinanet_channels_anchor_major(src, tgt):
    old = state("retinanet", len(src))
    new, report = resize_state_dict(old, src, tgt, seed=0)
    assert report["heads"] == ["retinanet"]
    anchors = old["head.bbox_pred.weight"].shape[0] // 4
    for p in ("weight", "bias"):
        key = f"{RETINANET}.{p}"
        assert torch.equal(new[key], expected_rows(old[key], new[key], src, tgt, 1, groups=anchors)), key
    fresh = [a * len(tgt) + j for a in range(anchors) for j, c in enumerate(tgt) if c not in src]
    prior = -math.log((1 - 0.01) / 0.01)
    assert all(new[f"{RETINANET}.bias"][i].item() == pytest.approx(prior) for i in fresh)
    # the layout as Detectron2 reads it: class c of anchor a after permute_to_N_HWA_K
    x = torch.randn(1, old[f"{RETINANET}.weight"].shape[1], 3, 3)
    logits = {n: permute_to_N_HWA_K(torch.nn.functional.conv2d(x, s[f"{RETINANET}.weight"], s[f"{RETINANET}.bias"],
                                                                padding=1), len(c))
              for n, s, c in (("old", old, src), ("new", new, tgt))}
    for j, name in enumerate(tgt):
        if name in src:
            torch.testing.assert_close(logits["new"][..., j], logits["old"][..., src.index(name)])
    loads_strictly("retinanet", len(tgt), new)


def test_prototype_bank_rows_and_init_prototypes():
    old = state("proto", 4)
    init = {NEU[4]: torch.tensor([3.0] + [0.0] * 14 + [4.0]), NEU[0]: torch.ones(16)}  # NEU[0] is kept: ignored
    new, report = resize_state_dict(old, BASE, PERMUTED, init_prototypes=init)
    assert report["heads"] == ["bbox_agnostic", "prototype_bank"] and report["prototypes_from_init"] == [NEU[4]]
    bank, filled = new[BANK], new[BANK + "_filled"]
    for j, name in enumerate(PERMUTED):
        if name in BASE:
            assert torch.equal(bank[j], old[BANK][BASE.index(name)])
            assert filled[j] == old[BANK + "_filled"][BASE.index(name)]
        elif name == NEU[4]:
            torch.testing.assert_close(bank[j], torch.tensor([0.6] + [0.0] * 14 + [0.8]))
            assert filled[j]
        else:
            assert not filled[j] and not bank[j].any()
    assert new[f"{BBOX}.weight"] is old[f"{BBOX}.weight"]  # class-agnostic regression kept as is
    loads_strictly("proto", 6, new)
    with pytest.raises(ValueError, match="not target classes"):
        resize_state_dict(old, BASE, NEU, init_prototypes={"oil_spot": torch.ones(16)})
    with pytest.raises(ValueError, match="dim 16"):
        resize_state_dict(old, BASE, NEU, init_prototypes={NEU[5]: torch.ones(8)})
    with pytest.raises(ValueError, match="no prototype bank"):
        resize_state_dict(state("faster", 4), BASE, NEU, init_prototypes={NEU[5]: torch.ones(16)})


def _bare(tmp_path, model_state):
    path = tmp_path / "bare.pth"
    torch.save({"model": model_state}, path)
    return path


def test_checkpoint_round_trip_keeps_only_the_model(tmp_path):
    old = state("faster", 4)
    src, dst = tmp_path / "model_final.pth", tmp_path / "resized.pth"
    torch.save({"model": old, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 9},
                "iteration": 9}, src)
    report = resize_checkpoint(str(src), str(dst), BASE, NEU, seed=5)
    assert report["discarded"] == ["iteration", "optimizer", "scheduler"] and report["new"] == NEU[4:]
    saved = torch.load(dst, map_location="cpu", weights_only=True)
    expected, _ = resize_state_dict(old, BASE, NEU, seed=5)
    assert list(saved) == ["model", "steel_fsd"] and saved["model"].keys() == expected.keys()
    assert saved["steel_fsd"] == {"thing_classes": NEU}  # the target classes travel with the weights
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pth", "resized.pth"]  # no temporary left
    torch.save({"model": old, "extra": torch.nn.Identity()}, src)  # not weights-only loadable: refused, never retried
    with pytest.raises(UnsafeWeightsError, match="refused: it pickles torch.nn.modules.linear.Identity"):
        resize_checkpoint(str(src), str(dst), BASE, NEU)
    with pytest.raises(ValueError, match="destination is the source"):
        resize_checkpoint(str(dst), str(dst), NEU, NEU)
    # the stored names rule: a source list in another order is refused (rows would be relabelled), none uses them
    again = tmp_path / "again.pth"
    with pytest.raises(ValueError, match=r"stores its classes \['crazing', .*but the source classes given are \['scratches'"):
        resize_checkpoint(str(dst), str(again), NEU[::-1], BASE)
    assert resize_checkpoint(str(dst), str(again), None, BASE)["new"] == []
    again.unlink()
    with pytest.raises(ValueError, match="stores no class names"):
        resize_checkpoint(str(_bare(tmp_path, old)), str(again), None, BASE)


def test_errors_name_the_problem(tmp_path):
    old = state("faster", 4)
    with pytest.raises(ValueError, match=r"source_classes has duplicate class names \['crazing'\]"):
        resize_state_dict(old, [NEU[0], NEU[1], NEU[0], NEU[2]], NEU)
    with pytest.raises(ValueError, match="target_classes has duplicate"):
        resize_state_dict(old, BASE, [NEU[5], NEU[5]])
    with pytest.raises(ValueError, match=r"roi_heads\.box_predictor\.cls_score\.weight: 5 rows, expected 6"):
        resize_state_dict(old, NEU[:5], NEU)
    with pytest.raises(ValueError, match=r"^head\.cls_score\.weight: \d+ rows, expected \d+ for the 4 source classes"):
        resize_state_dict(state("retinanet", 6), BASE, NEU)
    backbone_only = {k: v for k, v in old.items() if k.startswith("backbone.")}
    with pytest.raises(ValueError, match="no class-specific head"):
        resize_state_dict(backbone_only, BASE, NEU)
    with pytest.raises(ValueError, match="no class-specific head"):  # class-agnostic regression alone
        resize_state_dict({k: v for k, v in state("proto", 4).items() if not k.startswith(BANK)}, BASE, NEU)
    path = tmp_path / "m.pth"
    torch.save({"model": old}, path)
    with pytest.raises(ValueError, match=f"{path}: .*cls_score"):
        resize_checkpoint(str(path), str(tmp_path / "out.pth"), NEU, NEU)
    assert not (tmp_path / "out.pth").exists()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsReadError, match=f"{path}: not a weights file"):
        resize_checkpoint(str(path), str(tmp_path / "out.pth"), BASE, NEU)


def test_cli_prints_the_report_and_rejects_unknown_datasets(tmp_path, monkeypatch, capsys):
    tool = load_tool("ckpt_surgery")
    src, dst = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"model": state("faster", 4), "iteration": 3}, src)
    argv = ["--src", str(src), "--dst", str(dst), "--source-classes", *BASE, "--target-classes", *PERMUTED]
    assert run_main(tool.main, argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["new"] == [NEU[5], NEU[4]] and report["discarded"] == ["iteration"] and dst.is_file()
    argv = ["--src", str(src), "--dst", str(tmp_path / "c.pth"), "--source-classes", *BASE,
            "--target-dataset", "no_such"]
    assert run_main(tool.main, argv) == 2
    assert "'no_such' is not registered" in capsys.readouterr().err and not (tmp_path / "c.pth").exists()


def test_freeze_exactly_the_named_groups_and_optimizer_skips_them():
    cfg = config("faster", 6)
    model = new_model("faster", 6)
    assert all(p.requires_grad for p in model.parameters())
    prefixes = ["backbone", "proposal_generator", "roi_heads.box_head.fc1"]
    frozen = freeze_parameters(model, prefixes)
    brute = [n for n, _ in model.named_parameters() if n.split(".")[0] in ("backbone", "proposal_generator")
             or n.split(".")[:3] == ["roi_heads", "box_head", "fc1"]]
    assert frozen == brute and len(brute) > 50
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == brute
    in_optimizer = {id(p) for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert freeze_parameters(model, []) == []
    with pytest.raises(ValueError, match=r"\['backbone2', 'roi_heads.box_head.fc'\].*'proposal_generator', 'roi_"):
        freeze_parameters(model, ["backbone2", "roi_heads.box_head.fc", "roi_heads"])
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("roi_heads.box_predictor"))


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel"])
def test_freeze_matches_whole_components_and_unwraps_the_parallel_wrapper(wrapper, tmp_path):
    net = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "backbone2": torch.nn.Linear(2, 2)})
    if wrapper == "DataParallel":  # without CUDA it only wraps: same "module." names as DDP
        wrapped = torch.nn.DataParallel(net)
    else:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if wrapper != "DataParallel":
            wrapped = torch.nn.parallel.DistributedDataParallel(net)
        assert next(iter(dict(wrapped.named_parameters()))) == "module.backbone.weight"
        assert freeze_parameters(wrapped, ["backbone."]) == ["backbone.weight", "backbone.bias"]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert net["backbone2"].weight.requires_grad and not net["backbone"].weight.requires_grad
