"""End to end: train the prototype head on synthetic NEU, register synthetic Severstal supports, evaluate
Severstal by prototype swap (no retraining); plus the episodic sampler."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from PIL import Image

from conftest import spot_images
from steel_fsd.data import register_neu, register_severstal
from steel_fsd.data.episodic import EpisodicBatchSampler
from steel_fsd.synthetic import make_neu_synthetic, make_severstal_synthetic
from steel_fsd.fewshot.adapt import evaluate_with_support, register_support
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.engine.loading import load_model_for_eval
from steel_fsd.engine.trainer import Trainer
from steel_fsd.fewshot.prototypes import PrototypeFileError, load_prototypes

CFG = "configs/demo/proto_R18_FPN_synth_neu.yaml"
REPO = Path(__file__).resolve().parents[1]


def test_episodic_sampler_batches_are_n_classes_by_k_images():
    rng = np.random.default_rng(0)
    dicts = [{"annotations": [{"category_id": int(c)} for c in rng.choice(6, size=rng.integers(1, 3))]}
             for _ in range(60)]
    sampler = EpisodicBatchSampler(dicts, n_way=3, k_images=2, seed=7)
    batches = list(itertools.islice(iter(sampler), 50))
    assert batches == list(itertools.islice(iter(EpisodicBatchSampler(dicts, 3, 2, seed=7)), 50))  # seeded
    for b in batches:
        assert len(b) == 6 and len(set(b)) == 6
        classes = [{a["category_id"] for a in dicts[i]["annotations"]} for i in b]
        # each consecutive pair of images shares a class, and the batch covers >= 2 classes (positives + negatives)
        assert all(classes[2 * j] & classes[2 * j + 1] for j in range(3))
        assert len(set().union(*classes)) >= 2
    with pytest.raises(ValueError, match="need 7 classes"):
        EpisodicBatchSampler(dicts, 7, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    register_neu("t_fs_neu_train", make_neu_synthetic(root / "neu", n_per_class=7, seed=1), split="train")
    register_neu("t_fs_neu_test", root / "neu", split="test")
    sev = make_severstal_synthetic(root / "sev", n_images=24, seed=1)
    for s in ("train", "test"):
        register_severstal(f"t_fs_sev_{s}", sev, split=s, tile=256)
    setup_logger(name="steel_fsd")
    cfg = build_config(CFG, ["DATASETS.TRAIN", "('t_fs_neu_train',)", "DATASETS.TEST", "('t_fs_neu_test',)",
                             "OUTPUT_DIR", str(root / "out"), "SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)",
                             "SOLVER.WARMUP_ITERS", "5", "INPUT.HARMONIZE.RESIZE", "128", "DATALOADER.NUM_WORKERS", "0",
                             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "SOLVER.CHECKPOINT_PERIOD", "1000",
                             "MODEL.PROTOTYPE.EMBED_DIM", "64", "SEED", "0"])
    finalize_config(cfg)
    trainer = Trainer(cfg)  # seeded by SEED
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, str(root / "out" / "model_final.pth"), root


@pytest.mark.slow
def test_register_severstal_supports_and_evaluate_by_prototype_swap(trained):
    cfg, weights, root = trained
    out = str(root / "protos.pt")
    ps = register_support(cfg, weights, "t_fs_sev_train", shots=2, seed=0, out=out, progress=False)
    assert ps.class_names == ["defect_1", "defect_2", "defect_3", "defect_4"] and ps.embed_dim == 64
    assert len(ps.support) == 8 and ps.weights_sha256
    back = load_prototypes(out)
    assert torch.equal(back.prototypes, ps.prototypes)
    res = evaluate_with_support(cfg, weights, out, ["t_fs_sev_test"])["t_fs_sev_test"]
    # 40 iterations from scratch: AP50 is near 0 and moves with float rounding; the swap's plumbing is checked
    # by the per-class keys here and the predicted classes below
    assert 0.0 <= res["bbox"]["AP50"] <= 100.0 and 0.0 <= res["prf"]["recall"] <= 100.0
    assert set(k.split("-", 1)[1] for k in res["bbox"] if k.startswith("AP50-")) == set(ps.class_names)

    # the swapped model predicts only the 4 Severstal classes, although it was built with 6
    c = cfg.clone()
    c.defrost()
    c.MODEL.WEIGHTS, c.MODEL.PROTOTYPE.SUPPORT_FILE, c.DATASETS.TEST = weights, out, ("t_fs_sev_test",)
    model = load_model_for_eval(c)
    assert model.roi_heads.box_predictor.num_classes == 6
    mapper = Trainer.build_test_loader(c, "t_fs_sev_test")
    with torch.no_grad():
        labels = torch.cat([model(b)[0]["instances"].pred_classes for b, _ in zip(mapper, range(6))])
    assert len(labels) and labels.max() <= 3

    # a prototype file whose classes do not match the evaluation dataset is a clear error
    c.DATASETS.TEST = ("t_fs_neu_test",)
    with pytest.raises(PrototypeFileError, match="do not match the dataset"):
        load_model_for_eval(c)


@pytest.mark.slow
def test_append_a_rare_class_and_manifest(trained, tmp_path):
    cfg, weights, _ = trained
    base = str(tmp_path / "base.pt")
    register_support(cfg, weights, "t_fs_sev_train", 1, 0, base, classes=["defect_1", "defect_2", "defect_3"],
                     progress=False)
    dicts = DatasetCatalog.get("t_fs_sev_train")
    rare = next(d for d in dicts if any(a["category_id"] == 3 for a in d["annotations"]))
    box = next(a["bbox"] for a in rare["annotations"] if a["category_id"] == 3)
    manifest = [{"image_key": rare["image_key"], "bbox": box}]
    both = register_support(cfg, weights, "t_fs_sev_train", 1, 0, str(tmp_path / "both.pt"), classes=["defect_4"],
                            manifest=manifest, append_to=base, progress=False)
    old = load_prototypes(base)
    assert both.class_names == old.class_names + ["defect_4"]
    assert torch.equal(both.prototypes[:3], old.prototypes)
    assert both.support[-1]["image_key"] == rare["image_key"] and both.support[-1]["bbox"] == box
    json.dumps(both.support)  # plain data


@pytest.mark.slow
def test_register_support_uses_exactly_a_kshot_manifest(trained, tmp_path):
    from steel_fsd.fewshot.support import kshot_manifest

    cfg, weights, _ = trained
    dicts = DatasetCatalog.get("t_fs_sev_train")
    names = ["defect_1", "defect_2", "defect_3", "defect_4"]
    manifest = kshot_manifest(dicts, names, shots=2, seed=3, source_sha256="0" * 64, dataset_name="t_fs_sev_train")
    ps = register_support(cfg, weights, "t_fs_sev_train", 2, seed=0, out=str(tmp_path / "m.pt"), manifest=manifest,
                          progress=False)
    got = sorted((s["image_key"], s["class"], tuple(s["bbox"])) for s in ps.support)
    want = sorted((s["image_key"], s["class"], tuple(s["bbox"])) for s in manifest["supports"])
    assert got == want


@pytest.mark.slow
def test_embed_instances_batched_equals_one_image_at_a_time(trained):
    """Batches of same-size images give each box the embedding it gets with its image alone, in pick order,
    images of two sizes mixed (a mapper that crops every other image)."""
    from steel_fsd.data.mapper import SteelDatasetMapper
    from steel_fsd.fewshot.adapt import embed_instances

    cfg, weights, _ = trained
    c = cfg.clone()
    c.defrost()
    c.MODEL.WEIGHTS = weights
    model = load_model_for_eval(c, check_classes=False)
    base = SteelDatasetMapper(c, is_train=False)

    def mapper(d):
        m = base(d)
        if d["image_id"] % 2:
            m["image"] = m["image"][:, :96, :].contiguous()
        return m
    dicts = [d for d in DatasetCatalog.get("t_fs_sev_train") if d["annotations"]][:12]
    picks = [(d, i) for d in dicts for i in range(len(d["annotations"]))][::-1]  # images split over the list
    assert len({id(d) for d, _ in picks}) > 8 and len(picks) > len({id(d) for d, _ in picks})
    batched = embed_instances(model, picks, mapper, batch_size=4)
    alone = torch.cat([embed_instances(model, [p], mapper, batch_size=1) for p in picks])
    assert batched.shape == alone.shape and torch.allclose(batched, alone, atol=1e-5)


@pytest.mark.slow
def test_new_class_with_the_models_trained_prototypes(trained, tmp_path):
    """--with-trained: the model's own prototypes (its checkpoint's bank) keep the trained classes, only the new
    class is embedded from supports (the same row as registering it alone)."""
    from steel_fsd.utils.cli import UserError

    cfg, weights, _ = trained
    ps = register_support(cfg, weights, "t_fs_sev_train", 2, 1, str(tmp_path / "w.pt"), classes=["defect_4"],
                          with_trained=True, progress=False)
    alone = register_support(cfg, weights, "t_fs_sev_train", 2, 1, str(tmp_path / "a.pt"), classes=["defect_4"],
                             progress=False)
    trained_names = list(MetadataCatalog.get("t_fs_neu_train").thing_classes)
    assert ps.class_names == trained_names + ["defect_4"] and (ps.shots, ps.seed) == (2, 1)
    bank = torch.load(weights, map_location="cpu", weights_only=False)["model"]["roi_heads.box_predictor.bank"]
    assert torch.allclose(ps.prototypes[:6], torch.as_tensor(bank).float())
    assert torch.allclose(ps.prototypes[6], alone.prototypes[0], atol=1e-6)
    assert [s["class"] for s in ps.support] == ["defect_4", "defect_4"] and ps.support == alone.support
    assert torch.equal(load_prototypes(str(tmp_path / "w.pt")).prototypes, ps.prototypes)
    with pytest.raises(UserError, match="not both"):
        register_support(cfg, weights, "t_fs_sev_train", 2, 1, str(tmp_path / "x.pt"), classes=["defect_4"],
                         with_trained=True, append_to=str(tmp_path / "a.pt"), progress=False)


@pytest.mark.slow
def test_a_new_defect_from_five_images_by_command(trained, tmp_path):
    """Five images and a CSV of their boxes, outside any registered dataset: register_support adds the class to
    the model's trained ones in one command, and predict.py with that file labels the new defect on held-out
    images."""
    cfg, weights, root = trained
    support = spot_images(tmp_path / "support", 5, seed=0)
    (tmp_path / "boxes.csv").write_text("image,x1,y1,x2,y2,class\n" + "".join(
        f"{name},{x0},{y0},{x1},{y1},spot\n" for name, (x0, y0, x1, y1) in support))
    held_out = spot_images(tmp_path / "new", 3, seed=1)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.dump())
    env = dict(os.environ, STEEL_FSD_DATASETS=str(tmp_path / "none"))
    tool = lambda name, *args: subprocess.run([sys.executable, str(REPO / "tools" / name), *args],  # noqa: E731
                                              capture_output=True, text=True, env=env, cwd=REPO)
    res = tool("register_support.py", "--config-file", str(cfg_file), "--weights", weights,
               "--dataset", f"spot=csv:{tmp_path / 'support'}:{tmp_path / 'boxes.csv'}", "--shots", "5",
               "--with-trained", "--out", str(tmp_path / "protos.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    ps = load_prototypes(str(tmp_path / "protos.pt"))
    assert ps.class_names == list(MetadataCatalog.get("t_fs_neu_train").thing_classes) + ["spot"]
    assert sorted(s["image_key"] for s in ps.support) == sorted(name for name, _ in support)

    res = tool("predict.py", "--config-file", str(cfg_file), "--weights", weights, "--prototypes",
               str(tmp_path / "protos.pt"), "--input", str(tmp_path / "new"), "--output", str(tmp_path / "pred"),
               "--no-overlays", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    assert res.returncode == 0, res.stderr[-3000:]
    dets = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert json.loads((tmp_path / "pred" / "summary.json").read_text())["classes"][-1] == "spot"
    # the tiny model's boxes are loose: its best "spot" detection in each held-out image must cover the spot
    covered = 0
    for name, (x0, y0, x1, y1) in held_out:
        spots = [d for d in dets if Path(d["file_name"]).name == name and d["category_name"] == "spot"]
        if spots:
            bx, by, bw, bh = max(spots, key=lambda d: d["score"])["bbox"]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            covered += bx <= cx <= bx + bw and by <= cy <= by + bh
    assert covered >= 2, [d for d in dets if d["category_name"] == "spot"][:10]
