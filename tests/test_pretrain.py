"""Pretraining pieces against brute-force references: NT-Xent, NNCLR's queue and loss, and the torchvision ->
Detectron2 ResNet converter (features equal to torchvision's)."""
import json
import math
from pathlib import Path

import pytest
from conftest import load_tool
import torch
import torch.nn.functional as F
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from steel_fsd.pretrain import SupportQueue, backbone_prefix, nnclr_loss, nt_xent, torchvision_to_detectron2


def nt_xent_reference(z1, z2, t):
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n2, n = len(z), len(z1)
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("n,d,t", [(4, 8, 0.1), (7, 3, 0.5), (1, 5, 1.0)])
def test_nt_xent_matches_brute_force(n, d, t):
    g = torch.Generator().manual_seed(n * 31 + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert float(nt_xent(z1, z2, t)) == pytest.approx(nt_xent_reference(z1, z2, t), rel=1e-5)
    # identical views with orthogonal partners: the loss falls as the temperature falls
    eye = torch.eye(4)
    assert float(nt_xent(eye, eye, 0.05)) < float(nt_xent(eye, eye, 1.0))
    with pytest.raises(ValueError):
        nt_xent(z1, z2[:, :1], t)


def test_support_queue_is_fifo_and_finds_the_nearest():
    q = SupportQueue(size=5, dim=3)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, generator=g) for _ in range(4)]
    for b in batches:
        q.push(b)
    kept = F.normalize(torch.cat(batches), dim=1)[-5:]
    assert len(q) == 5 and torch.allclose(q.items, kept)
    z = torch.randn(6, 3, generator=g)
    want = torch.stack([kept[max(range(5), key=lambda k: float(F.normalize(r, dim=0) @ kept[k]))] for r in z])
    assert torch.equal(q.nearest(z), want)
    with pytest.raises(ValueError, match="empty"):
        SupportQueue(3, 3).nearest(z)


def test_nnclr_loss_uses_queue_neighbours_as_queries():
    g = torch.Generator().manual_seed(1)
    q = SupportQueue(size=16, dim=4)
    q.push(torch.randn(10, 4, generator=g))
    z1, z2, p1, p2 = (torch.randn(5, 4, generator=g) for _ in range(4))
    before = q.items.clone()
    nn1, nn2 = q.nearest(z1), q.nearest(z2)

    def side(nn, p):
        logits = [[float(F.normalize(a, dim=0) @ F.normalize(b, dim=0)) / 0.1 for b in p] for a in nn]
        return sum(-math.log(math.exp(r[i]) / sum(math.exp(v) for v in r)) for i, r in enumerate(logits)) / len(p)

    assert float(nnclr_loss(z1, z2, p1, p2, q)) == pytest.approx(0.5 * (side(nn1, p2) + side(nn2, p1)), rel=1e-5)
    assert torch.allclose(q.items, torch.cat([before, F.normalize(z1, dim=1)])[-16:])  # z1 pushed afterwards


def d2_resnet(depth: int, norm: str = "BN"):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision: stride in the 3x3 conv
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize("depth", [18, 50])
def test_converted_torchvision_resnet_gives_torchvisions_features(depth):
    torch.manual_seed(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    tv.eval()
    d2 = d2_resnet(depth).eval()
    converted = torchvision_to_detectron2({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}},
                                          prefix="")
    missing, unexpected = d2.load_state_dict(converted, strict=False)
    assert not unexpected and not missing
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        feats = d2(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, name in enumerate(["res2", "res3", "res4", "res5"], 1):
            y = getattr(tv, f"layer{i}")(y)
            torch.testing.assert_close(feats[name], y, rtol=1e-5, atol=1e-5)


def test_converted_weights_cover_an_fpn_models_backbone():
    from steel_fsd.engine.setup import build_config

    cfg = build_config("configs/Base-RCNN-FPN.yaml", ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "50",
                                                      "MODEL.RESNETS.NORM", "FrozenBN"])
    model_state = build_model(cfg).state_dict()
    prefix = backbone_prefix(model_state)
    assert prefix == "backbone.bottom_up."
    converted = torchvision_to_detectron2(torchvision.models.resnet50().state_dict(), prefix)
    backbone = {k for k in model_state if k.startswith(prefix)}
    # FrozenBN keeps weight, bias, running_mean, running_var (no num_batches_tracked)
    assert backbone <= set(converted)
    assert all(converted[k].shape == model_state[k].shape for k in backbone)
    assert not [k for k in converted if "fc." in k]
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        torchvision_to_detectron2({"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)})


def test_convert_tool_round_trip_and_errors(tmp_path):
    """tools/convert_torchvision.py: the written file loads into the config's model through the project's
    checkpointer with every backbone tensor matched and changed; GN configs and bad files are refused."""
    from steel_fsd.engine.setup import build_config
    from steel_fsd.modeling.checkpoint import SafeCheckpointer
    from steel_fsd.utils.cli import run_main

    tool = load_tool("convert_torchvision")
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    opts = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "FrozenBN",
            "MODEL.RESNETS.STRIDE_IN_1X1", "False", "MODEL.DEVICE", "cpu"]
    out = tmp_path / "r18_d2.pth"
    assert run_main(tool.main, ["--weights", str(tmp_path / "r18.pth"), "--config-file", "configs/Base-RCNN-FPN.yaml",
                                "--out", str(out), *opts]) == 0
    model = build_model(build_config("configs/Base-RCNN-FPN.yaml", opts))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ck = SafeCheckpointer(model)
    ck.load(str(out))
    backbone = [k for k in before if k.startswith("backbone.bottom_up.")]
    assert not [k for k in ck.last_incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    after = model.state_dict()
    assert torch.equal(after["backbone.bottom_up.stem.conv1.weight"], tv.conv1.weight)
    assert all(not torch.equal(before[k], after[k]) for k in backbone if k.endswith("conv1.weight"))
    gn = ["--weights", str(tmp_path / "r18.pth"), "--config-file", "configs/Base-R18-GN-CPU.yaml",
          "--out", str(tmp_path / "x.pth")]
    assert run_main(tool.main, gn) == 2  # GroupNorm config: refused with one line
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    assert run_main(tool.main, ["--weights", str(tmp_path / "bad.pth"), "--config-file", "configs/Base-RCNN-FPN.yaml",
                                "--out", str(tmp_path / "y.pth"), *opts]) == 2


@pytest.fixture(scope="module")
def tiny_neu(tmp_path_factory):
    from steel_fsd.data import register_neu
    from steel_fsd.synthetic import make_neu_synthetic

    root = tmp_path_factory.mktemp("pre")
    make_neu_synthetic(root / "neu", n_per_class=2, seed=0)
    register_neu("t_pre_train", root / "neu", split=None)
    return root


@pytest.mark.parametrize("method", ["simclr", "nnclr", "supervised"])
def test_pretrain_exports_the_configs_backbone_and_resumes(tiny_neu, tmp_path, method):
    """One tiny epoch per method: the file loads into the detector config's model with every backbone tensor
    matched and changed; a second call with more epochs resumes (history grows, the first epoch is kept)."""
    from detectron2.data import DatasetCatalog

    from steel_fsd.engine.setup import build_config, finalize_config
    from steel_fsd.modeling.checkpoint import SafeCheckpointer
    from steel_fsd.pretrain.train import pretrain
    from steel_fsd.utils.cli import UserError

    opts = ["INPUT.HARMONIZE.RESIZE", "64", "DATASETS.TRAIN", "('t_pre_train',)", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(tmp_path / "o"), "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "4"]
    cfg = finalize_config(build_config("configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml", opts))
    dicts = DatasetCatalog.get("t_pre_train")
    out = str(tmp_path / "w.pth")
    rec = pretrain(cfg, dicts, method, 1, out, batch=6, label_classes=[0, 1, 2] if method == "supervised" else None,
                   progress=False)
    assert rec["images"] == 12 and len(rec["history"]) == 1 and math.isfinite(rec["history"][0]["loss"])
    assert 0.0 <= rec["history"][0]["probe"]["train"] <= 100.0 and Path(out + ".png").stat().st_size > 0
    assert 0.0 <= rec["probe_init"]["train"] <= 100.0  # the initial backbone's probe, the reference
    first, init = rec["history"][0], rec["probe_init"]
    rec = pretrain(cfg, dicts, method, 2, out, batch=6, label_classes=[0, 1, 2] if method == "supervised" else None,
                   progress=False)
    assert len(rec["history"]) == 2 and rec["history"][0] == first  # resumed after epoch 1
    assert rec["probe_init"] == init  # carried over, not re-measured on the trained weights
    other = "simclr" if method != "simclr" else "nnclr"  # resuming with another method: one line, not a traceback
    with pytest.raises(UserError, match=f"resumable state of a {method} pretraining, not of this {other} one"):
        pretrain(cfg, dicts, other, 3, out, batch=6, progress=False)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up.")}
    ck = SafeCheckpointer(model)
    ck.load(out)
    assert not [k for k in ck.last_incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    assert not ck.last_incompatible.unexpected_keys
    after = model.state_dict()
    changed = [k for k in before if k.endswith(".weight") and not torch.equal(before[k], after[k])]
    assert len(changed) == sum(k.endswith(".weight") for k in before)


def _tool_args(tmp_path, train: str = "t_pre_train") -> tuple[list[str], list[str]]:
    """(the pretraining tool's common arguments, tiny config overrides) for the synthetic fixtures."""
    return (["--config-file", "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml", "--epochs", "1", "--batch", "6"],
            ["INPUT.HARMONIZE.RESIZE", "64", "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", "()",
             "OUTPUT_DIR", str(tmp_path / "o"), "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "4"])


def test_pretrain_tool_from_folders_and_its_errors(tiny_neu, tmp_path):
    from pathlib import Path

    from steel_fsd.utils.cli import run_main

    tool = load_tool("pretrain_backbone")
    common, opts = _tool_args(tmp_path)
    out = tmp_path / "f.pth"
    assert run_main(tool.main, [*common, "--images", str(tiny_neu / "neu"), "--out", str(out), "--crop", "32",
                                *opts]) == 0
    record = json.loads(Path(str(out) + ".json").read_text())
    assert out.is_file() and record["images"] == 12 and record["crop"] == 32
    # views larger than the images cannot be cropped from them
    assert run_main(tool.main, [*common, "--images", str(tiny_neu / "neu"), "--out", str(tmp_path / "c.pth"),
                                "--crop", "65", *opts]) == 2
    # labels need a dataset; unknown classes and empty folders are one-line errors
    assert run_main(tool.main, [*common, "--images", str(tiny_neu / "neu"), "--method", "supervised",
                                "--out", str(tmp_path / "s.pth"), *opts]) == 2
    assert run_main(tool.main, [*common, "--datasets", "t_pre_train", "--method", "supervised", "--classes", "nope",
                                "--out", str(tmp_path / "s.pth"), *opts]) == 2
    # base/novel: supervised on the base classes uses only the images whose boxes are all of those classes
    from detectron2.data import DatasetCatalog, MetadataCatalog

    base = ["crazing", "patches", "scratches"]
    names = MetadataCatalog.get("t_pre_train").thing_classes
    expect = sum(all(names[a["category_id"]] in base for a in d["annotations"]) for d in DatasetCatalog.get("t_pre_train"))
    assert 0 < expect < 12
    assert run_main(tool.main, [*common, "--datasets", "t_pre_train", "--method", "supervised", "--classes", *base,
                                "--out", str(tmp_path / "b.pth"), *opts]) == 0
    assert json.loads(Path(str(tmp_path / "b.pth") + ".json").read_text())["images"] == expect
    (tmp_path / "empty").mkdir()
    assert run_main(tool.main, [*common, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "e.pth"),
                                *opts]) == 2


def test_augmented_views_keep_the_image_in_0_255():
    """The views stay images on the 0-255 scale: brightness in [0.6, 1.4] of a flat grey image, texture kept.
    (torchvision clamps float images to [0, 1] in ColorJitter: views of 0-255 floats used to come out blank,
    which held the SimCLR loss at chance, log(2N - 1), on real NEU-DET.)"""
    from steel_fsd.pretrain.train import augmented_views, steel_augment

    torch.manual_seed(0)
    flat = torch.full((16, 3, 64, 64), 100, dtype=torch.uint8)
    views = augmented_views(flat, steel_augment(48))
    assert views.shape == (16, 3, 48, 48)
    means = views.mean(dim=(1, 2, 3))
    assert bool((means > 100 * 0.6 - 3).all() and (means < 100 * 1.4 + 3).all()), means
    assert float(means.std()) > 3  # brightness jitter acts
    texture = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    views = augmented_views(texture, steel_augment(48))
    assert float(views.std(dim=(1, 2, 3)).min()) > 5 and float(views.max()) > 100  # a blank view: noise only, std <= 2.55


def test_linear_probe_separates_separable_features_and_not_noise():
    from steel_fsd.pretrain.train import linear_probe, single_labels

    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(40)
    separable = torch.randn(120, 8, generator=g) * 0.1 + F.one_hot(y, 8).float() * 3
    assert linear_probe(separable, y) == 100.0
    assert linear_probe(torch.randn(120, 8, generator=g), y) < 70.0  # chance is 33%
    assert torch.equal(single_labels([{"annotations": [{"category_id": 2}, {"category_id": 2}]},
                                      {"annotations": [{"category_id": 0}, {"category_id": 1}]}, {}]),
                       torch.tensor([2, -1, -1]))
    assert single_labels([{"file_name": "x"}]) is None


def test_label_targets_masks_and_novel_classes_dropped():
    from steel_fsd.pretrain.sources import SOURCE_KEY, drop_classes, label_targets, source_masks
    from steel_fsd.utils.cli import UserError

    dicts = [{SOURCE_KEY: "neu", "annotations": [{"category_id": 0}, {"category_id": 2}]},
             {SOURCE_KEY: "neu", "annotations": [{"category_id": 1}]},
             {SOURCE_KEY: "xsdd", "annotations": [], "image_labels": [1]},
             {SOURCE_KEY: "", "file_name": "folder.png"}]
    y = label_targets(dicts, {"neu": [0, 2], "xsdd": [0, 1, 2]})
    # neu's space is classes 0 and 2 (class 1 outside it is ignored); xsdd's three classes
    assert y["neu"].tolist() == [[1, 1], [0, 0], [0, 0], [0, 0]]
    assert y["xsdd"].tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]
    m = source_masks(dicts, ["neu", "xsdd", ""])
    assert m["neu"].tolist() == [True, True, False, False] and m[""].tolist() == [False, False, False, True]
    names = {"neu": ["crazing", "inclusion", "patches"], "xsdd": ["red_iron", "slag_inclusion"], "": []}
    kept = drop_classes(dicts, names, ["patches", "slag_inclusion"])  # a box of patches, an image label of slag
    assert kept == [dicts[1], dicts[3]]
    with pytest.raises(UserError, match="no source has these classes"):
        drop_classes(dicts, names, ["nope"])


@pytest.fixture(scope="module")
def split_neu(tmp_path_factory):
    """A synthetic NEU-DET folder large enough for non-empty splits, registered as t_hold_{train,val,test}."""
    from steel_fsd.data import register_neu
    from steel_fsd.synthetic import make_neu_synthetic

    root = tmp_path_factory.mktemp("hold") / "neu"
    make_neu_synthetic(root, n_per_class=7, seed=1)
    for split in ("train", "val", "test"):
        register_neu(f"t_hold_{split}", root, split=split)
    return root


def test_held_out_images_are_refused(split_neu):
    from detectron2.data import DatasetCatalog

    from steel_fsd.pretrain.sources import check_no_held_out, held_out_files
    from steel_fsd.utils.cli import UserError

    held = held_out_files([d["file_name"] for d in DatasetCatalog.get("t_hold_train")])
    assert {f for f, n in held.items() if n.startswith("t_hold_")} == {
        str(Path(d["file_name"]).resolve()) for s in ("val", "test") for d in DatasetCatalog.get(f"t_hold_{s}")}
    check_no_held_out(DatasetCatalog.get("t_hold_train"), "--datasets")  # the training split passes
    test_file = DatasetCatalog.get("t_hold_test")[0]["file_name"]
    with pytest.raises(UserError, match=rf"1 pretraining images .*{Path(test_file).name} in t_hold_test"):
        check_no_held_out(DatasetCatalog.get("t_hold_train") + [{"file_name": test_file}], "--images")


def test_sharded_weights_round_trip_and_errors(tmp_path):
    from steel_fsd.modeling.checkpoint import SafeCheckpointer, WeightsReadError, read_weights_file, save_sharded

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    weights = model.state_dict()
    path = str(tmp_path / "w.pth")
    names = save_sharded(weights, path, 4 * 2**20)
    assert len(names) > 1
    for n in names:  # at most 4 MiB of tensors a piece, or one tensor larger than that alone
        piece = torch.load(tmp_path / n, weights_only=True)["model"]
        assert sum(v.numel() * v.element_size() for v in piece.values()) <= 4 * 2**20 or len(piece) == 1
    joined = read_weights_file(path)["model"]
    assert set(joined) == set(weights) and all(torch.equal(joined[k], weights[k]) for k in weights)
    twin = torchvision.models.resnet18()
    SafeCheckpointer(twin).load(path)  # the checkpointer reads the index as one file
    assert all(torch.equal(twin.state_dict()[k], weights[k]) for k in weights)
    piece1 = (tmp_path / names[1]).read_bytes()
    (tmp_path / names[1]).unlink()
    with pytest.raises(WeightsReadError, match=r"w\.pth: its piece .*w\.pth\.part1 is missing"):
        read_weights_file(path)
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / names[1])  # another file in its place
    with pytest.raises(WeightsReadError, match="not the one it was written with"):
        read_weights_file(path)
    (tmp_path / names[1]).write_bytes(piece1)
    torch.save({"steel_fsd.shards": ["w.pth"], "tensors": 1}, tmp_path / "idx.pth")  # a piece naming an index
    torch.save({"steel_fsd.shards": ["idx.pth"], "tensors": 1}, tmp_path / "outer.pth")
    with pytest.raises(WeightsReadError, match="itself an index"):
        read_weights_file(str(tmp_path / "outer.pth"))


@pytest.fixture(scope="module")
def two_sources(tiny_neu):
    """t_pre_train (synthetic NEU-DET, six box classes) and t_pre_img: image-level labels over two classes."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from steel_fsd.data import register_neu

    register_neu("t_pre_img_src", tiny_neu / "neu", split=None)
    if "t_pre_img" not in DatasetCatalog.list():
        def load():
            return [dict(d, annotations=[], image_labels=[i % 2], image_id=100 + i)
                    for i, d in enumerate(DatasetCatalog.get("t_pre_img_src")[:8])]
        DatasetCatalog.register("t_pre_img", load)
        MetadataCatalog.get("t_pre_img").set(thing_classes=["dark", "bright"], dataset_root=str(tiny_neu / "neu"),
                                             split="all")
    return tiny_neu


@pytest.mark.slow
def test_multi_source_supervised_and_simclr_with_a_held_out_probe(two_sources, tmp_path):
    from detectron2.data import DatasetCatalog

    from steel_fsd.engine.setup import build_config, finalize_config
    from steel_fsd.pretrain.sources import SOURCE_KEY
    from steel_fsd.pretrain.train import pretrain

    opts = ["INPUT.HARMONIZE.RESIZE", "64", "DATASETS.TRAIN", "('t_pre_train',)", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(tmp_path / "o"), "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "4"]
    cfg = finalize_config(build_config("configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml", opts))
    dicts = [dict(d, **{SOURCE_KEY: n}) for n in ("t_pre_train", "t_pre_img") for d in DatasetCatalog.get(n)]
    out = str(tmp_path / "m.pth")
    rec = pretrain(cfg, dicts, "supervised+simclr", 1, out, batch=6, progress=False,
                   label_spaces={"t_pre_train": list(range(6)), "t_pre_img": [0, 1]},
                   probes={"held": DatasetCatalog.get("t_pre_train")}, shard_mib=4)
    assert rec["sources"] == {"t_pre_img": 8, "t_pre_train": 12} and rec["label_spaces"] == {"t_pre_train": 6,
                                                                                             "t_pre_img": 2}
    assert set(rec["probe_init"]) == {"held"} and 0 <= rec["history"][0]["probe"]["held"] <= 100
    assert math.isfinite(rec["history"][0]["loss"]) and len(rec["shards"]) >= 2
    state = torch.load(out + ".state.pth", weights_only=True)["encoder"]
    assert state["classifiers.s0.weight"].shape[0] == 6 and state["classifiers.s1.weight"].shape[0] == 2
    model = build_model(cfg)
    from steel_fsd.modeling.checkpoint import SafeCheckpointer
    ck = SafeCheckpointer(model)
    ck.load(out)
    assert not [k for k in ck.last_incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    with pytest.raises(ValueError, match="per source"):
        pretrain(cfg, dicts, "supervised", 1, str(tmp_path / "x.pth"), batch=6, progress=False, label_classes=[0])


def test_pretrain_tool_several_datasets_and_excluded_classes(two_sources, tmp_path):
    from steel_fsd.utils.cli import run_main

    tool = load_tool("pretrain_backbone")
    common, opts = _tool_args(tmp_path)
    out = tmp_path / "t.pth"
    assert run_main(tool.main, [*common, "--datasets", "t_pre_train", "t_pre_img", "--method", "supervised",
                                "--exclude-classes", "patches", "bright", "--out", str(out), *opts]) == 0
    rec = json.loads(Path(str(out) + ".json").read_text())
    from detectron2.data import DatasetCatalog, MetadataCatalog
    names = MetadataCatalog.get("t_pre_train").thing_classes
    keep_neu = sum(not any(names[a["category_id"]] == "patches" for a in d["annotations"])
                   for d in DatasetCatalog.get("t_pre_train"))
    assert rec["sources"] == {"t_pre_train": keep_neu, "t_pre_img": 4}  # the "bright" half of t_pre_img left out
    assert rec["label_spaces"] == {"t_pre_train": 5, "t_pre_img": 1}

def test_pretrain_tool_refuses_a_folder_with_held_out_images(split_neu, tmp_path):
    from steel_fsd.utils.cli import run_main

    tool = load_tool("pretrain_backbone")
    common, opts = _tool_args(tmp_path, "t_hold_train")
    assert run_main(tool.main, [*common, "--images", str(split_neu), "--out", str(tmp_path / "h.pth"), *opts]) == 2
    assert not (tmp_path / "h.pth").exists()


@pytest.mark.slow
def test_pretrain_time_budget_stops_after_the_epoch_that_spends_it(tiny_neu, tmp_path):
    from detectron2.data import DatasetCatalog

    from steel_fsd.engine.setup import build_config, finalize_config
    from steel_fsd.pretrain.train import pretrain

    opts = ["INPUT.HARMONIZE.RESIZE", "64", "DATASETS.TRAIN", "('t_pre_train',)", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(tmp_path / "o"), "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "4"]
    cfg = finalize_config(build_config("configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml", opts))
    rec = pretrain(cfg, DatasetCatalog.get("t_pre_train"), "simclr", 3, str(tmp_path / "b.pth"), batch=6,
                   progress=False, crop=32, max_minutes=1e-6)
    assert len(rec["history"]) == 1 and rec["stopped_early"] == {"after_epoch": 1, "max_minutes": 1e-6}
    assert (tmp_path / "b.pth").is_file()
