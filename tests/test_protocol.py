"""The few-shot protocol: derived datasets, cell records, and an end-to-end run of tools/run_fewshot.py on tiny
synthetic data (every setting kind, three methods, two seeds, one variant row), resumed a second time."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog

from steel_fsd.data import register_neu, register_severstal
from steel_fsd.fewshot.support import kshot_manifest, load_manifest
from steel_fsd.data.subsets import register_class_subset, restrict_classes
from steel_fsd.fewshot.support import register_manifest
from steel_fsd.synthetic import make_neu_synthetic, make_severstal_synthetic
from steel_fsd.fewshot.protocol import Protocol, cell_record
from steel_fsd.utils.cli import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol_data")
    neu = make_neu_synthetic(root / "neu", n_per_class=7, seed=3)
    sev = make_severstal_synthetic(root / "sev", n_images=24, seed=3)
    for s in ("train", "val", "test"):
        register_neu(f"t_pr_neu_{s}", neu, split=s)
        register_severstal(f"t_pr_sev_{s}", sev, split=s, tile=256)
    return root


def test_class_subset_drops_images_with_other_classes_and_reindexes(data):
    parent = "t_pr_neu_train"
    classes = list(MetadataCatalog.get(parent).thing_classes)
    keep = [classes[3], classes[1]]
    register_class_subset("t_pr_subset", parent, keep)
    got = DatasetCatalog.get("t_pr_subset")
    want = []  # brute force: images whose every box is of a kept class, ids mapped by name
    for d in DatasetCatalog.get(parent):
        names = [classes[a["category_id"]] for a in d["annotations"]]
        if all(n in keep for n in names):
            want.append((d["image_id"], [keep.index(n) for n in names]))
    assert [(d["image_id"], [a["category_id"] for a in d["annotations"]]) for d in got] == want
    assert MetadataCatalog.get("t_pr_subset").thing_classes == keep
    kept_all = restrict_classes(DatasetCatalog.get(parent), classes, keep)  # erase instead of drop
    assert len(kept_all) == len(DatasetCatalog.get(parent)) > len(got)
    with pytest.raises(ValueError, match="not among"):
        register_class_subset("t_pr_bad", parent, ["no_such_defect"])


def test_manifest_dataset_holds_exactly_the_manifest_boxes(data, tmp_path):
    from steel_fsd.fewshot.support import write_manifest

    parent = "t_pr_neu_train"
    classes = list(MetadataCatalog.get(parent).thing_classes)
    m = kshot_manifest(DatasetCatalog.get(parent), classes, 2, 5, "0" * 64, parent)
    write_manifest(tmp_path / "m.json", m)
    register_manifest("t_pr_m", parent, tmp_path / "m.json")
    got = sorted((str(d.get("image_key", d["image_id"])), a["category_id"], tuple(a["bbox"])) for d in DatasetCatalog.get("t_pr_m")
                 for a in d["annotations"])
    want = sorted((e["image_key"], e["category_id"], tuple(e["bbox"])) for e in m["supports"])
    assert got == want and len(got) == 2 * len(classes)
    with pytest.raises(ValueError, match="manifest classes"):
        register_manifest("t_pr_m2", "t_pr_sev_train", tmp_path / "m.json")


def test_cell_record_base_novel_means_and_no_predictions():
    classes = ["a", "b", "c"]
    bbox = {"AP": 20.0, "AP50": 40.0, "AP75": 10.0, "AP-a": 10.0, "AP-b": 30.0, "AP-c": float("nan"),
            "AP50-a": 20.0, "AP50-b": 50.0, "AP50-c": 60.0, "AP75-a": 0.0, "AP75-b": 1.0, "AP75-c": 2.0}
    rec = cell_record({"bbox": bbox, "prf": {}}, classes, ["a", "b"], ["c"])
    assert rec["bAP"] == pytest.approx(20.0) and rec["nAP"] is None  # NaN-only group: no value
    assert rec["bAP50"] == pytest.approx(35.0) and rec["nAP50"] == pytest.approx(60.0)
    assert rec["per_class"]["b"]["AP50"] == 50.0 and not rec["no_predictions"]
    empty = cell_record({"bbox": {k: float("nan") for k in ("AP", "AP50", "AP75")}, "prf": {}}, classes, [], [])
    assert empty["no_predictions"] and empty["metrics"]["AP50"] == 0.0 and empty["per_class"]["a"]["AP"] == 0.0
    assert empty["bAP"] is None
    assert empty["img_R@FA1"] is None and empty["img_AUC"] is None  # no image-level result: not measured


def test_cell_record_image_level_fields():
    il = {"good_images": 10.0, "defect_images": 20.0, "recall@FA1%": 35.0, "recall@FA5%": float("nan"),
          "roc_auc": 0.8125}
    rec = cell_record({"bbox": {"AP": 1.0}, "prf": {}, "image_level": il}, ["a"], [], [])
    assert rec["img_R@FA1"] == 35.0 and rec["img_R@FA5"] is None and rec["img_AUC"] == pytest.approx(81.25)


TINY = ["INPUT.HARMONIZE.RESIZE", 96, "SOLVER.MAX_ITER", 6, "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", 2,
        "TEST.EVAL_PERIOD", 3, "TEST.VAL_LOSS_PERIOD", 3, "TEST.VAL_LOSS_IMAGES", 4, "SOLVER.CHECKPOINT_PERIOD", 1000,
        "DATALOADER.NUM_WORKERS", 0, "MODEL.PROTOTYPE.EMBED_DIM", 32, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", 8]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """Run the protocol once; returns (output dir, protocol file, mtimes of every cell and model after run 1)."""
    import run_fewshot

    out = tmp_path_factory.mktemp("protocol_out")
    tlsdd = out / "tlsdd.yaml"  # the demo prototype model with TL-SDD's class-specific reweighting
    tlsdd.write_text(f"_BASE_: {REPO / 'configs/demo/proto_R18_FPN_synth_neu.yaml'}\n"
                     "MODEL:\n  PROTOTYPE:\n    REWEIGHT_HIDDEN: 16\n")
    spec = {"OUTPUT_DIR": str(out), "SHOTS": [2], "SEEDS": [0, 1],
            "DATASETS": {"neu": {p: f"t_pr_neu_{p}" for p in ("train", "val", "test")},
                         "sev": {p: f"t_pr_sev_{p}" for p in ("train", "val", "test")}},
            "MODELS": {"prototype": str(REPO / "configs/demo/proto_R18_FPN_synth_neu.yaml"),
                       "faster_rcnn": str(REPO / "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml"),
                       "tlsdd": str(tlsdd)},
            "METHODS": {"prototype": {"model": "prototype", "adapt": "support"},
                        "prototype_ft": {"model": "prototype", "adapt": "finetune"},
                        "finetune": {"model": "faster_rcnn", "adapt": "finetune"},
                        "prototype_pcb": {"model": "prototype", "adapt": "support_pcb"},
                        "finetune_pcb": {"model": "faster_rcnn", "adapt": "finetune_pcb"},
                        "tlsdd": {"model": "tlsdd", "adapt": "finetune"},
                        "tlsdd_support": {"model": "tlsdd", "adapt": "support"},
                        "prototype_novel": {"model": "prototype", "adapt": "support_novel"}},
            "SETTINGS": [{"kind": "base_novel", "dataset": "neu", "novel": ["inclusion", "scratches"]},
                         {"kind": "cross", "source": "neu", "target": "sev"},
                         {"kind": "kshot", "dataset": "sev"}],
            "BASE_OPTS": TINY,
            "FINETUNE_OPTS": ["MODEL.FREEZE", "['backbone', 'proposal_generator']", "SOLVER.MAX_ITER", 3,
                              "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", 1],
            "KSHOT_OPTS": ["SOLVER.MAX_ITER", 4, "TEST.EVAL_PERIOD", 0, "TEST.VAL_LOSS_PERIOD", 0],
            "VARIANTS": {"preprocessing": {"off": {"model": "prototype", "dataset": "neu",
                                                   "opts": ["INPUT.HARMONIZE.CLAHE", False, "INPUT.AUG.ENABLED", False]}}}}
    path = out / "protocol.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = [["--config", str(path), "--settings", "base_novel", "cross", "--no-variants"],
            ["--config", str(path), "--settings", "kshot", "--methods", "prototype", "finetune", "--seeds", "1",
             "--no-variants"],
            ["--config", str(path), "--variants-only"]]
    torch.manual_seed(0)
    for i, args in enumerate(runs):
        before = set(out.rglob("K*_seed*.json"))
        assert run_fewshot.main(args) == 0
        added = set(out.rglob("K*_seed*.json")) - before
        # --no-variants runs no VARIANTS row; --variants-only runs them and no cell
        assert {p.parent.parent.name == "preprocessing_neu" for p in added} == {i == 2}
    stamps = {p: p.stat().st_mtime_ns for p in list(out.rglob("K*_seed*.json")) + list(out.rglob("model_final.pth"))}
    return out, runs, stamps


@pytest.mark.slow
def test_protocol_writes_every_cell_with_consistent_metrics(run):
    out, _, _ = run
    cells = {p.relative_to(out / "cells").as_posix(): json.loads(p.read_text())
             for p in (out / "cells").rglob("K*_seed*.json")}
    settings = ["base_novel_neu_novel-inclusion+scratches", "cross_neu-sev"]
    methods = ("prototype", "prototype_ft", "finetune", "prototype_pcb", "finetune_pcb", "tlsdd", "tlsdd_support",
               "prototype_novel")
    want = {f"{s}/{m}/K2_seed{seed}.json" for s in settings for m in methods for seed in (0, 1)} | {
        "preprocessing_neu/off/K0_seed0.json", "kshot_sev/prototype/K2_seed1.json", "kshot_sev/finetune/K2_seed1.json"}
    assert set(cells) == want
    for name, c in cells.items():
        per_class_ap = [v["AP"] for v in c["per_class"].values()]
        assert c["classes"] == list(c["per_class"]) and all(0.0 <= v <= 100.0 for v in per_class_ap if v is not None)
        assert all(isinstance(v, float) for v in per_class_ap if v is not None)  # NaN is written as null
        if c["kind"] == "base_novel":
            assert c["novel_classes"] == ["inclusion", "scratches"] and len(c["base_classes"]) == 4
            finite = [c["per_class"][k]["AP"] for k in c["novel_classes"] if c["per_class"][k]["AP"] is not None]
            assert c["nAP"] == (pytest.approx(sum(finite) / len(finite)) if finite else None)
            # the no-forgetting reference: the method's own base model on the test split's base classes
            model = {"finetune": "faster_rcnn", "finetune_pcb": "faster_rcnn"}.get(
                c["method"], "tlsdd" if c["method"].startswith("tlsdd") else "prototype")
            ref = json.loads(next((out / "models").glob(f"{model}_neu_base-*/base_test_t_pr_neu_test.json")).read_text())
            assert ref["base_classes"] == c["base_classes"] and c["base_model_bAP50"] == ref["bAP50"]
            if c["bAP50"] is not None and ref["bAP50"] is not None:
                assert c["dbAP50"] == pytest.approx(c["bAP50"] - ref["bAP50"])
        # image level: the Severstal tiles' test split has defect-free tiles, the NEU one has none
        il = json.loads((out / "cells" / name).with_suffix("").joinpath(
            "inference", c.get("test", f"t_pr_{c['target']}_test"), "image_level.json").read_text()) \
            if c["kind"] in ("cross", "kshot") else None
        if il is not None:
            assert c["img_R@FA1"] == pytest.approx(il["recall@FA1%"]) and c["img_AUC"] == pytest.approx(100 * il["roc_auc"])
        else:
            assert c["img_AUC"] is None
        swap = c["method"] in ("prototype", "prototype_pcb", "tlsdd_support", "prototype_novel")
        assert (c["adapt_iters"] == 0) == (swap and c["kind"] != "kshot" or c["kind"] == "preprocessing")
    # the runner's aggregate equals a hand computation from the per-cell json
    results = json.loads((out / "results.json").read_text())
    for row in results["rows"]:
        group = [c for c in cells.values() if (c["setting"], c["method"], c["shots"]) ==
                 (row["setting"], row["method"], row["shots"])]
        vals = [c["metrics"]["AP50"] for c in group]
        assert row["AP50"]["n"] == len(vals) and row["AP50"]["mean"] == pytest.approx(sum(vals) / len(vals))
        if len(vals) == 2:
            sd = abs(vals[0] - vals[1]) / math.sqrt(2)
            assert row["AP50"]["ci95"] == pytest.approx(12.706204736 * sd / math.sqrt(2), rel=1e-6)
    assert "## Base/novel" in (out / "report.md").read_text()
    assert list((out / "plots").glob("*.png"))


@pytest.mark.slow
def test_novel_only_swap_keeps_the_base_models_prototypes(run):
    """support_novel: in a base/novel cell the base classes keep the base model's bank rows and only the novel
    classes' K boxes are embedded (the same rows as the full swap's); in a cross cell it is the full swap."""
    from steel_fsd.fewshot.prototypes import load_prototypes

    out, _, _ = run
    cells = out / "cells" / "base_novel_neu_novel-inclusion+scratches"
    novel = load_prototypes(str(cells / "prototype_novel" / "K2_seed0" / "prototypes.pt"))
    full = load_prototypes(str(cells / "prototype" / "K2_seed0" / "prototypes.pt"))
    base_dir = next((out / "models").glob("prototype_neu_base-*"))
    ckpt = torch.load(base_dir / "model_final.pth", map_location="cpu", weights_only=False)
    base_classes = ckpt["steel_fsd"]["thing_classes"]
    assert novel.class_names == base_classes + ["inclusion", "scratches"] and len(base_classes) == 4
    assert torch.allclose(novel.prototypes[:4], torch.as_tensor(ckpt["model"]["roi_heads.box_predictor.bank"]).float())
    for i, name in enumerate(["inclusion", "scratches"]):
        assert torch.allclose(novel.prototypes[4 + i], full.prototypes[full.class_names.index(name)], atol=1e-5)
    assert sorted(s["class"] for s in novel.support) == ["inclusion"] * 2 + ["scratches"] * 2
    assert {json.dumps(s, sort_keys=True) for s in novel.support} <= {json.dumps(s, sort_keys=True) for s in full.support}
    cross = out / "cells" / "cross_neu-sev"
    a, b = (load_prototypes(str(cross / m / "K2_seed1" / "prototypes.pt")) for m in ("prototype_novel", "prototype"))
    assert a.class_names == b.class_names and torch.allclose(a.prototypes, b.prototypes, atol=1e-6)


@pytest.mark.slow
def test_protocol_manifests_match_prepare_fewshot_and_are_disjoint_from_test(run):
    out, _, _ = run
    for path in (out / "manifests").glob("*.json"):
        m = load_manifest(path)
        again = kshot_manifest(DatasetCatalog.get(m["dataset"]), m["class_names"], m["shots"], m["seed"],
                               m["source_sha256"], m["dataset"])
        assert again == m
        test_keys = {str(d.get("image_key", d["image_id"])).split("@")[0]
                     for d in DatasetCatalog.get(m["dataset"].replace("_train", "_test"))}
        assert not {e["image_key"].split("@")[0] for e in m["supports"]} & test_keys


@pytest.mark.slow
def test_finetune_freezes_backbone_and_rpn_and_resizes_heads(run):
    out, _, _ = run
    cell_dir = out / "cells" / "base_novel_neu_novel-inclusion+scratches" / "finetune" / "K2_seed0"
    base_dir = next((out / "models").glob("faster_rcnn_neu_base-*"))
    base = torch.load(base_dir / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    tuned = torch.load(cell_dir / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    # the adapted model carries the base model's pixel statistics for the tools that apply it
    assert (json.loads((cell_dir / "pixel_stats.json").read_text()) ==
            json.loads((base_dir / "pixel_stats.json").read_text()))
    frozen = [k for k in base if k.startswith(("backbone.", "proposal_generator."))]
    assert frozen and all(torch.equal(torch.as_tensor(base[k]), torch.as_tensor(tuned[k])) for k in frozen)
    assert tuned["roi_heads.box_predictor.cls_score.weight"].shape[0] == 7  # 6 classes + background
    assert not torch.equal(torch.as_tensor(base["roi_heads.box_head.fc1.weight"]),
                           torch.as_tensor(tuned["roi_heads.box_head.fc1.weight"]))
    # TL-SDD's phase 2: the base model's reweighting MLP is carried over by the surgery and fine-tuned
    tl_base = torch.load(next((out / "models").glob("tlsdd_neu_base-*")) / "model_final.pth", map_location="cpu",
                         weights_only=False)["model"]
    tl_tuned = torch.load(out / "cells" / "base_novel_neu_novel-inclusion+scratches" / "tlsdd" / "K2_seed0" /
                          "model_final.pth", map_location="cpu", weights_only=False)["model"]
    key = "roi_heads.box_predictor.reweight.2.weight"
    assert tl_base[key].shape == tl_tuned[key].shape and not torch.equal(torch.as_tensor(tl_base[key]),
                                                                        torch.as_tensor(tl_tuned[key]))
    info = json.loads((base_dir / "train_info.json").read_text())
    assert info["train"].startswith("base:") and info["num_images"] == len(DatasetCatalog.get(info["train"]))
    metrics = [json.loads(line) for line in (base_dir / "metrics.json").read_text().splitlines()]
    assert any("val_total_loss" in r for r in metrics) and any("bbox/AP" in r for r in metrics)


@pytest.mark.slow
def test_protocol_rerun_skips_finished_cells_and_models(run):
    import run_fewshot

    out, runs, stamps = run
    for args in runs:
        assert run_fewshot.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_protocol_rerun_adds_the_base_reference_to_older_cells(run):
    """A base/novel cell written before the no-forgetting reference existed gets it on the next run, with the
    same values as a fresh cell; nothing else is rewritten."""
    import run_fewshot

    out, runs, _ = run
    path = out / "cells" / "base_novel_neu_novel-inclusion+scratches" / "prototype" / "K2_seed1.json"
    full = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in full.items() if k not in ("base_model_bAP", "base_model_bAP50",
                                                                          "dbAP50")}))
    others = {p: p.stat().st_mtime_ns for p in out.rglob("K*_seed*.json") if p != path}
    assert run_fewshot.main(runs[0]) == 0
    assert json.loads(path.read_text()) == full
    assert {p: p.stat().st_mtime_ns for p in others} == others
    assert "bAP50 − base" in (out / "report.md").read_text()


@pytest.mark.slow
def test_protocol_on_the_validation_split_reuses_the_models(run, tmp_path):
    """MODELS_DIR: the same protocol evaluated on the val split (to choose settings) takes the first run's base
    models instead of training its own; its cells and no-forgetting reference are on the val split."""
    import run_fewshot

    out, runs, stamps = run
    spec = yaml.safe_load(Path(runs[0][1]).read_text())
    spec["DATASETS"]["neu"]["test"] = "t_pr_neu_val"
    spec.update(OUTPUT_DIR=str(tmp_path / "val"), MODELS_DIR=str(out / "models"))
    path = tmp_path / "val.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_fewshot.main(["--config", str(path), "--only", "base_novel_neu_novel-inclusion+scratches",
                             "--methods", "prototype", "--seeds", "0", "--no-variants"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps if p.name == "model_final.pth"} == {
        p: t for p, t in stamps.items() if p.name == "model_final.pth"}
    assert not (tmp_path / "val" / "models").exists()
    cell = json.loads((tmp_path / "val" / "cells" / "base_novel_neu_novel-inclusion+scratches" / "prototype" /
                       "K2_seed0.json").read_text())
    assert "/t_pr_neu_val/" in cell["pr_curves"]
    ref = json.loads(next((out / "models").glob("prototype_neu_base-*/base_test_t_pr_neu_val.json")).read_text())
    assert cell["base_model_bAP50"] == ref["bAP50"] and ref["test"] == "t_pr_neu_val"


def test_protocol_file_errors(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"DATASETS": {"neu": {}}, "MODELS": {"m": "x.yaml"},
                                   "METHODS": {"a": {"model": "m", "adapt": "teleport"}}, "SETTINGS": []}))
    with pytest.raises(ValueError, match="method a"):
        Protocol(bad)
    bad.write_text(yaml.safe_dump({"DATASETS": {"neu": {}}, "MODELS": {"m": "x.yaml"}, "METHODS": {},
                                   "SETTINGS": [{"kind": "cross", "source": "neu", "target": "mars"}]}))
    with pytest.raises(ValueError, match="'mars' is not in DATASETS"):
        Protocol(bad)
    bad.write_text(yaml.safe_dump({"DATASETS": {}}))
    with pytest.raises(ValueError, match="missing keys"):
        Protocol(bad)


def test_protocol_file_base(tmp_path):
    """``_BASE_`` (relative to the file) supplies every key the file does not set; a set key replaces the base's
    whole; cycles and missing bases are errors naming the files."""
    from steel_fsd.utils.cli import UserError

    base = {"DATASETS": {"neu": {"train": "neu_train"}}, "MODELS": {"m": "x.yaml"},
            "METHODS": {"a": {"model": "m", "adapt": "support"}}, "SETTINGS": [], "SEEDS": [0, 1, 2, 3, 4],
            "BASE_OPTS": ["SOLVER.MAX_ITER", 500, "SOLVER.BASE_LR", 0.02], "OUTPUT_DIR": "out/short"}
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    child = tmp_path / "sub" / "long.yaml"
    child.write_text(yaml.safe_dump({"_BASE_": "../base.yaml", "BASE_OPTS": ["SOLVER.MAX_ITER", 2500],
                                     "OUTPUT_DIR": "out/long"}))
    proto = Protocol(child)
    assert proto.base_opts == ["SOLVER.MAX_ITER", "2500"]  # replaced whole, not merged with the base's list
    assert str(proto.out) == "out/long" and proto.seeds == [0, 1, 2, 3, 4] and list(proto.methods) == ["a"]
    assert str(Protocol(tmp_path / "base.yaml").out) == "out/short"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(dict(base, _BASE_="sub/long.yaml")))
    with pytest.raises(UserError, match="_BASE_ cycle"):
        Protocol(child)
    child.write_text(yaml.safe_dump({"_BASE_": "nope.yaml"}))
    with pytest.raises(UserError, match=r"nope.yaml not found \(a _BASE_ of .*long.yaml\)"):
        Protocol(child)


def test_pretrained_backbone_per_model(tmp_path, monkeypatch):
    """PRETRAINED: {model: weights} names models of the file (checked at parse time), needs its file when the model
    trains, and becomes MODEL.WEIGHTS of that model's training."""
    from steel_fsd.fewshot.protocol import runner
    from steel_fsd.utils.cli import UserError

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    spec = {"DATASETS": {"neu": {"train": "t_pre_proto", "val": "t_pre_proto", "test": "t_pre_proto"}},
            "MODELS": {"m": "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml"},
            "METHODS": {"a": {"model": "m", "adapt": "finetune"}}, "SETTINGS": [], "OUTPUT_DIR": str(tmp_path / "o"),
            "BASE_OPTS": ["INPUT.HARMONIZE.NORMALIZE", False]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(dict(spec, PRETRAINED={"nope": str(weights)})))
    with pytest.raises(ValueError, match="nope"):
        Protocol(path)
    # a missing file is an error when the model trains, not when the file is read (--list, --report-only)
    path.write_text(yaml.safe_dump(dict(spec, PRETRAINED={"m": str(tmp_path / "missing.pth")})))
    with pytest.raises(UserError, match=r"PRETRAINED m: weights file .*missing.pth not found"):
        Protocol(path).pretrained_weights("m")  # what train() calls first
    path.write_text(yaml.safe_dump(dict(spec, PRETRAINED={"m": str(weights)})))
    proto = Protocol(path)
    DatasetCatalog.register("t_pre_proto", lambda: [{"file_name": "x.png", "image_id": 0, "height": 8, "width": 8,
                                                     "annotations": []}])
    MetadataCatalog.get("t_pre_proto").set(thing_classes=["a", "b"], evaluator_type="coco")
    seen = {}

    class Stop(Exception):
        pass

    class FakeTrainer:
        def __init__(self, cfg):
            seen["weights"] = cfg.MODEL.WEIGHTS
            raise Stop

    monkeypatch.setattr(runner, "Trainer", FakeTrainer)
    with pytest.raises(Stop):
        proto.train("m", "t_pre_proto", "t_pre_proto", proto.base_opts, "label")
    assert seen["weights"] == str(weights)


def test_variants_flags_exclude_each_other(tmp_path):
    import run_fewshot

    with pytest.raises(UserError, match="--no-variants and --variants-only exclude each other"):
        run_fewshot.main(["--config", str(REPO / "configs/protocols/synth_cpu.yaml"), "--no-variants",
                          "--variants-only", "--datasets-root", str(tmp_path)])


def test_seeds_argument_ranges():
    import run_fewshot

    assert run_fewshot.seeds_arg(["0..4"]) == [0, 1, 2, 3, 4]
    assert run_fewshot.seeds_arg(["3", "7..8"]) == [3, 7, 8]
    assert np.array_equal(run_fewshot.seeds_arg(["2"]), [2])


def test_novel_class_typos_and_paths_are_refused_before_any_training(data, tmp_path):
    from steel_fsd.utils.cli import UserError

    spec = {"OUTPUT_DIR": str(tmp_path / "out"), "SHOTS": [1], "SEEDS": [0],
            "DATASETS": {"neu": {p: f"t_pr_neu_{p}" for p in ("train", "val", "test")}},
            "MODELS": {"prototype": str(REPO / "configs/demo/proto_R18_FPN_synth_neu.yaml")},
            "METHODS": {"prototype": {"model": "prototype", "adapt": "support"}},
            "SETTINGS": [{"kind": "base_novel", "dataset": "neu", "novel": ["inclusoin"]}]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=r"novel classes \['inclusoin'\] are not classes of t_pr_neu_train"):
        Protocol(path).run()
    assert not (tmp_path / "out" / "models").exists()  # nothing trained
    for novel in (["../../etc"], ["a/b"], [""], []):
        spec["SETTINGS"][0]["novel"] = novel
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(UserError, match="novel"):
            Protocol(path)


def test_swap_methods_apply_their_opts_to_a_copy_of_the_base_config(monkeypatch):
    """A support (swap) method's ``opts`` reach the evaluation config (e.g. more proposals at adaptation time);
    the base model's config is left as it was for the other methods."""
    from steel_fsd.engine.setup import build_config
    from steel_fsd.fewshot.protocol import methods

    cfg = build_config("configs/prototype/proto_R18_FPN_GN_neu_cpu.yaml")
    cfg.freeze()
    seen = []
    monkeypatch.setattr(methods, "support_eval", lambda c, *a, **k: seen.append(c.MODEL.RPN.POST_NMS_TOPK_TEST) or {})
    ctx = methods.AdaptContext(None, "prototype", cfg, "w.pth", None, "s", {}, 1, 0, "t", None,
                               ["MODEL.RPN.POST_NMS_TOPK_TEST", "1000"])
    methods.ADAPTERS.get("support")(ctx)
    plain = methods.AdaptContext(None, "prototype", cfg, "w.pth", None, "s", {}, 1, 0, "t", None)
    methods.ADAPTERS.get("support")(plain)
    assert seen == [1000, cfg.MODEL.RPN.POST_NMS_TOPK_TEST] and cfg.MODEL.RPN.POST_NMS_TOPK_TEST != 1000


def test_base_objectness_names_dataset_keys_and_skips_the_settings_own(tmp_path):
    import yaml

    from steel_fsd.fewshot.protocol.spec import ProtocolSpec

    spec = {"DATASETS": {"a": {"train": "a_train", "val": "a_val", "test": "a_test"},
                         "b": {"train": "b_train", "val": "b_val", "test": "b_test"}},
            "MODELS": {"m": "configs/prototype/proto_R18_FPN_GN_neu_cpu.yaml"},
            "METHODS": {"p": {"model": "m", "adapt": "support"}},
            "SETTINGS": [{"kind": "cross", "source": "a", "target": "b"}], "BASE_OBJECTNESS": ["a", "c"]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"BASE_OBJECTNESS \['c'\] are not DATASETS keys"):
        ProtocolSpec(path)
    spec["BASE_OBJECTNESS"] = ["a", "b"]
    path.write_text(yaml.safe_dump(spec))
    from steel_fsd.fewshot.protocol.runner import Protocol

    protocol = Protocol(path, out_dir=str(tmp_path))
    # the only setting is a -> b: both are its own, so no objectness view is added
    assert protocol.objectness_views(protocol.settings[0], ["x"]) == ()
