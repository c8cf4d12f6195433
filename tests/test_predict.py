"""Inspection-time prediction: inputs, tiling of strips and merging across tiles, decisions, and tools/predict.py
end to end (a briefly trained demo model; bad inputs)."""
import csv
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances, pairwise_iou

from steel_fsd.inference.predict import Predictor, find_images, image_decision, merge_tile_detections, tile_windows
from steel_fsd.engine.setup import build_config
from steel_fsd.utils.cli import UserError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
CFG = str(REPO / "configs" / "demo" / "faster_rcnn_R18_FPN_synth_neu.yaml")
PROTO_CFG = str(REPO / "configs" / "demo" / "proto_R18_FPN_synth_neu.yaml")


class BrightBoxModel(torch.nn.Module):
    """A stand-in detector with a known output: one box around the bright pixels of each input (in the
    input's original pixels, as Detectron2's models return), score 0.9, class 1."""

    def forward(self, inputs):
        outs = []
        for d in inputs:
            img = d["image"].float().mean(0)
            sy, sx = d["height"] / img.shape[0], d["width"] / img.shape[1]
            ys, xs = torch.nonzero(img > 200, as_tuple=True)
            inst = Instances((d["height"], d["width"]))
            if len(xs):
                box = torch.tensor([[xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy]])
                inst.pred_boxes, inst.scores, inst.pred_classes = Boxes(box.float()), torch.tensor([0.9]), torch.tensor([1])
            else:
                inst.pred_boxes, inst.scores = Boxes(torch.zeros(0, 4)), torch.zeros(0)
                inst.pred_classes = torch.zeros(0, dtype=torch.long)
            outs.append({"instances": inst})
        return outs


def _image(h, w, box):
    img = np.full((h, w, 3), 40, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 255
    return img


def _stub_predictor(**kwargs):
    cfg = build_config(CFG, ["INPUT.HARMONIZE.CLAHE", "False"])
    return Predictor(cfg, BrightBoxModel(), ["a", "b"], **kwargs)


def test_tile_windows_cover_a_strip_like_the_training_tiles():
    wins = tile_windows(256, 1600, 256, 32)
    assert [w[0] for w in wins] == [0, 224, 448, 672, 896, 1120, 1344]
    assert all(w[2] - w[0] == 256 and w[1] == 0 and w[3] == 256 for w in wins)
    assert tile_windows(200, 200, 256, 32) == [(0, 0, 200, 200)] and tile_windows(256, 1600, 0, 32) == [(0, 0, 1600, 256)]


@pytest.mark.parametrize("defect", [(230, 60, 300, 120), (200, 60, 500, 120), (20, 10, 90, 50)])
def test_strip_defect_crossing_tile_borders_gives_one_box(defect):
    img = _image(256, 1600, defect)
    pred = _stub_predictor()
    assert len(pred.windows(256, 1600)) == 7  # auto: a strip is tiled into 256-pixel squares
    (inst,) = pred([img])
    assert len(inst) == 1
    iou = float(pairwise_iou(inst.pred_boxes, Boxes(torch.tensor([defect], dtype=torch.float32))))
    assert iou > 0.9, (inst.pred_boxes, defect)


def test_square_image_is_not_tiled_and_boxes_are_in_original_pixels():
    pred = _stub_predictor()
    (inst,) = pred([_image(200, 200, (50, 60, 110, 90))])
    assert pred.windows(200, 200) == [(0, 0, 200, 200)]
    assert inst.image_size == (200, 200)
    np.testing.assert_allclose(inst.pred_boxes.tensor[0].numpy(), [50, 60, 110, 90], atol=2.0)


def test_merge_joins_only_boxes_of_one_class_from_different_tiles():
    big, inner = [0.0, 0, 50, 50], [10.0, 10, 30, 30]  # IoU 0.16 (NMS keeps both), inner fully inside big
    scores, same_class = torch.tensor([0.9, 0.8]), torch.tensor([0, 0])
    b, s, _ = merge_tile_detections(torch.tensor([inner, big]), scores, same_class, torch.tensor([1, 0]))
    assert b.tolist() == [big] and s.tolist() == pytest.approx([0.9])  # union box, highest score
    b, _, _ = merge_tile_detections(torch.tensor([inner, big]), scores, same_class, torch.tensor([0, 0]))
    assert len(b) == 2  # one tile: the model's own NMS decided, nothing is merged
    b, _, _ = merge_tile_detections(torch.tensor([inner, big]), scores, torch.tensor([0, 1]), torch.tensor([1, 0]))
    assert len(b) == 2  # other class
    # intersection 10x50 over the smaller 50x50 box = 0.2 < 0.5: two defects side by side stay two
    b, _, _ = merge_tile_detections(torch.tensor([[0.0, 0, 50, 50], [40, 0, 100, 50]]), scores, same_class,
                                    torch.tensor([0, 1]))
    assert len(b) == 2


def test_image_decision_uses_the_top_detection():
    inst = Instances((10, 10), pred_boxes=Boxes(torch.zeros(2, 4)), scores=torch.tensor([0.3, 0.7]),
                     pred_classes=torch.tensor([0, 1]))
    d = image_decision(inst, ["a", "b"], 0.5)
    assert d.defect and d.worst_class == "b" and d.max_score == pytest.approx(0.7)
    assert not image_decision(inst, ["a", "b"], 0.71).defect
    empty = Instances((10, 10), pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0),
                      pred_classes=torch.zeros(0, dtype=torch.long))
    assert not image_decision(empty, ["a"], 0.0).defect


def test_find_images_files_folders_globs_and_errors(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ("a/x.png", "a/b/y.JPG", "a/notes.txt", "z.bmp"):
        (tmp_path / p).write_bytes(b"0")
    got = find_images([str(tmp_path / "a"), str(tmp_path / "*.bmp"), str(tmp_path / "a" / "x.png")])
    assert [os.path.relpath(p, tmp_path) for p in got] == ["a/b/y.JPG", "a/x.png", "z.bmp"]
    with pytest.raises(UserError, match="does not exist"):
        find_images([str(tmp_path / "missing")])
    with pytest.raises(UserError, match="matches no file"):
        find_images([str(tmp_path / "*.tif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image found"):
        find_images([str(tmp_path / "empty")])


TINY = ["INPUT.HARMONIZE.RESIZE", "96", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "8", "MODEL.PROTOTYPE.EMBED_DIM", "32", "SEED", "0",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "DATASETS.TEST", "()"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prototype demo model after 2 iterations (outputs are not meaningful; files and plumbing are)."""
    from detectron2.data import DatasetCatalog

    from steel_fsd.data import register_neu
    from steel_fsd.engine.setup import finalize_config
    from steel_fsd.engine.trainer import Trainer
    from steel_fsd.synthetic import make_neu_synthetic

    tmp = tmp_path_factory.mktemp("predict")
    root = make_neu_synthetic(tmp / "neu", n_per_class=2, seed=0)
    if "t_pred_train" not in DatasetCatalog.list():
        register_neu("t_pred_train", root, split="train")
    out = tmp / "run"
    cfg = build_config(PROTO_CFG, TINY + ["DATASETS.TRAIN", "('t_pred_train',)", "OUTPUT_DIR", str(out)])
    finalize_config(cfg, datasets=("TRAIN",))
    trainer = Trainer(cfg)
    trainer.train()
    images = tmp / "images"
    images.mkdir()
    for i, p in enumerate(sorted((root / "IMAGES").glob("*.jpg"))[:2]):
        (images / f"neu{i}.jpg").write_bytes(p.read_bytes())
    (images / "sub").mkdir()
    cv2.imwrite(str(images / "sub" / "strip.png"), _image(256, 1600, (230, 60, 300, 120)))
    return {"weights": str(out / "model_final.pth"), "images": images, "tmp": tmp}


def _predict(*argv):
    import predict
    from steel_fsd.utils.cli import run_main
    # the training run's config: its pixel_stats.json (next to the weights) is then used
    return run_main(predict.main, ["--config-file", PROTO_CFG, *argv, *TINY, "DATASETS.TRAIN", "('t_pred_train',)"])


def test_predict_tool_writes_json_csv_overlays_and_reports_skips(trained, tmp_path, capsys):
    bad = trained["images"] / "truncated.png"
    good = cv2.imencode(".png", _image(200, 200, (10, 10, 50, 50)))[1].tobytes()
    bad.write_bytes(good[: len(good) // 2])
    try:
        out = tmp_path / "out"
        rc = _predict("--weights", trained["weights"], "--input", str(trained["images"]), "--output", str(out))
        assert rc == 1  # a skipped image makes the run exit non-zero
        assert "truncated.png" in capsys.readouterr().err
        with open(out / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and [r["decision"] for r in rows].count("skipped") == 1
        assert {r["file"].split(os.sep)[-1] for r in rows} == {"neu0.jpg", "neu1.jpg", "strip.png", "truncated.png"}
        strip_row = next(r for r in rows if r["file"].endswith("strip.png"))
        assert (int(strip_row["width"]), int(strip_row["height"])) == (1600, 256)
        preds = json.loads((out / "predictions.json").read_text())
        sizes = {int(r["image_id"]): (int(r["width"]), int(r["height"])) for r in rows if r["width"]}
        assert preds and all(p["image_id"] in sizes for p in preds)
        for p in preds:  # boxes in the original pixels of their image
            w, h = sizes[p["image_id"]]
            x, y, bw, bh = p["bbox"]
            assert -1e-3 <= x and x + bw <= w + 1e-3 and -1e-3 <= y and y + bh <= h + 1e-3
        assert len(list((out / "overlays").glob("*.png"))) == 3
        summary = json.loads((out / "summary.json").read_text())
        assert summary["skipped"] == 1 and summary["predicted"] == 3 and summary["threshold_source"] == "TEST.PRF_SCORE_THRESH"
        threshold = tmp_path / "t.json"
        threshold.write_text(json.dumps({"score_threshold": 2.0}))  # would pass every image: refused
        rc = _predict("--weights", trained["weights"], "--input", str(trained["images"]), "--output", str(out),
                      "--allow-skips", "--threshold-file", str(threshold), "--no-overlays")
        assert rc == 2 and "not a number in [0, 1]" in capsys.readouterr().err
        threshold.write_text(json.dumps({"score_threshold": 1.0}))
        rc = _predict("--weights", trained["weights"], "--input", str(trained["images"]), "--output", str(out),
                      "--allow-skips", "--threshold-file", str(threshold), "--no-overlays")
        assert rc == 0
        with open(out / "predictions.csv") as f:
            assert {r["decision"] for r in csv.DictReader(f)} == {"pass", "skipped"}  # nothing scores >= 1
    finally:
        bad.unlink()


def test_predict_tool_refuses_bad_setups_before_any_image_is_read(trained, tmp_path, capsys):
    from steel_fsd.fewshot.prototypes import PrototypeSet, save_prototypes

    protos = tmp_path / "p.pt"
    save_prototypes(PrototypeSet(["x"], torch.randn(1, 7), 1, 0), str(protos))
    out = tmp_path / "out"
    rc = _predict("--weights", trained["weights"], "--prototypes", str(protos), "--input", str(trained["images"]),
                  "--output", str(out))
    assert rc == 2 and "embed dim 7" in capsys.readouterr().err
    assert not (out / "predictions.csv").exists()
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert _predict("--weights", trained["weights"], "--input", str(trained["images"]), "--output", str(a_file)) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _predict("--weights", trained["weights"], "--input", str(tmp_path / "empty"), "--output", str(out)) == 2
    assert "no image found" in capsys.readouterr().err


def test_calibrate_threshold_meets_the_false_alarm_rate_within_one_image(trained, tmp_path):
    import calibrate_threshold
    from steel_fsd.utils.cli import run_main

    good = sorted(trained["tmp"].joinpath("neu", "IMAGES").glob("*.jpg"))  # 12 images playing "good product"
    out = tmp_path / "threshold.json"
    rc = run_main(calibrate_threshold.main, ["--config-file", PROTO_CFG, "--weights", trained["weights"],
                                             "--good-images", *map(str, good), "--defect-images", str(trained["images"]),
                                             "--false-alarm", "0.25", "--out", str(out), *TINY,
                                             "DATASETS.TRAIN", "('t_pred_train',)"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["good_images"] == 12 and res["defect_images"] == 3
    assert 0.25 - 1 / 12 < res["false_alarm"] <= 0.25  # 3 of 12 good images rejected (scores are distinct)
    assert Path(res["roc_png"]).is_file()
    # predict.py applies it: the calibration's good images are rejected at the calibrated rate
    pred_out = tmp_path / "pred"
    assert _predict("--weights", trained["weights"], "--input", *map(str, good), "--output", str(pred_out),
                    "--threshold-file", str(out), "--no-overlays") == 0
    with open(pred_out / "predictions.csv") as f:
        assert [r["decision"] for r in csv.DictReader(f)].count("reject") == round(res["false_alarm"] * 12)


def test_calibration_splits_a_dataset_into_good_and_defect_images():
    from detectron2.data import DatasetCatalog

    import calibrate_threshold

    dicts = [{"file_name": "/a.png", "annotations": []}, {"file_name": "/b.png", "annotations": [{"bbox": [0, 0, 1, 1]}]},
             {"file_name": "/c.png", "annotations": []}, {"file_name": "/c.png", "annotations": [{"bbox": [0, 0, 1, 1]}]}]
    if "t_calib_split" not in DatasetCatalog.list():
        DatasetCatalog.register("t_calib_split", lambda: dicts)
    good, defect = calibrate_threshold.dataset_images("t_calib_split")
    assert good == ["/a.png"] and defect == ["/b.png", "/c.png"]  # a tile with a defect makes its image a defect


@pytest.mark.parametrize("config", [CFG, PROTO_CFG])
def test_torchscript_export_gives_the_eager_boxes(config, tmp_path):
    from detectron2.modeling import build_model

    from steel_fsd.inference.export import trace_model
    from steel_fsd.synthetic import make_neu_synthetic

    cfg = build_config(config, ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.PROTOTYPE.EMBED_DIM", "32"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if config == PROTO_CFG:  # prototypes swapped in are baked into the export
        model.roi_heads.box_predictor.set_support(torch.nn.functional.normalize(torch.randn(3, 32), dim=1))
    root = make_neu_synthetic(tmp_path / "neu", n_per_class=1, seed=3)
    images = [torch.as_tensor(cv2.imread(str(p)).transpose(2, 0, 1).copy()) for p in sorted((root / "IMAGES").glob("*.jpg"))[:3]]
    traced, adapter = trace_model(model, images[0])
    traced.save(str(tmp_path / "m.ts"))
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    for img in images[1:]:  # other images than the one traced on
        boxes, classes, scores, _ = loaded(img)
        with torch.no_grad():
            ref = model.inference([{"image": img}], do_postprocess=False)[0]
        assert len(ref) > 0 and len(boxes) == len(ref)
        torch.testing.assert_close(boxes, ref.pred_boxes.tensor, atol=1e-3, rtol=0)
        torch.testing.assert_close(scores, ref.scores, atol=1e-3, rtol=0)
        assert torch.equal(classes, ref.pred_classes)
        if config == PROTO_CFG:
            assert int(classes.max()) <= 2  # the 3 support classes, not the 6 trained ones


def test_export_tool_writes_model_and_check(trained, tmp_path):
    import export_model
    from steel_fsd.utils.cli import run_main

    sample = next(trained["images"].glob("*.jpg"))
    rc = run_main(export_model.main, ["--config-file", PROTO_CFG, "--weights", trained["weights"], "--output",
                                      str(tmp_path), "--sample-image", str(sample), *TINY,
                                      "DATASETS.TRAIN", "('t_pred_train',)"])
    assert rc == 0
    rec = json.loads((tmp_path / "export.json").read_text())
    assert rec["check"]["same_count"] and rec["check"]["same_classes"] and rec["check"]["max_box_diff"] <= 1e-3
    assert rec["input"]["traced_size"] == [96, 96] and len(rec["classes"]) == 6
    assert (tmp_path / "model.ts").is_file()


def test_predict_tool_json_and_overlay_put_the_box_on_a_known_defect(tmp_path, monkeypatch):
    """tools/predict.py with a stand-in detector whose output is fixed by the image: the json box and the
    overlay's red box lie on the synthetic defect, for a square image and a tiled strip."""
    import predict
    from steel_fsd.inference import predict as predict_mod
    from steel_fsd.utils.cli import run_main

    monkeypatch.setattr(predict_mod.Predictor, "from_files",
                        classmethod(lambda cls, cfg, w, p=None, **kw: cls(cfg, BrightBoxModel(), ["a", "b"], **kw)))
    defects = {"square.png": ((200, 200), (50, 60, 110, 90)), "strip.png": ((256, 1600), (200, 60, 500, 120))}
    for name, (shape, box) in defects.items():
        cv2.imwrite(str(tmp_path / name), _image(*shape, box))
    out = tmp_path / "out"
    rc = run_main(predict.main, ["--config-file", CFG, "--weights", "unused.pth", "--input", str(tmp_path / "*.png"),
                                 "--output", str(out), "INPUT.HARMONIZE.CLAHE", "False", "INPUT.HARMONIZE.NORMALIZE",
                                 "False"])
    assert rc == 0
    preds = json.loads((out / "predictions.json").read_text())
    with open(out / "predictions.csv") as f:
        files = {int(r["image_id"]): Path(r["file"]).name for r in csv.DictReader(f)}
    assert sorted(files.values()) == sorted(defects)
    for p in preds:
        x, y, w, h = p["bbox"]
        truth = torch.tensor([defects[files[p["image_id"]]][1]], dtype=torch.float32)
        assert float(pairwise_iou(Boxes(torch.tensor([[x, y, x + w, y + h]])), Boxes(truth))) > 0.5
        assert p["category_name"] == "b" and p["score"] == pytest.approx(0.9)
    assert len(preds) == 2  # one box per image: the strip's defect spans two tile borders
    for png in (out / "overlays").glob("*.png"):
        name = png.name.split("_", 1)[1]
        (h, w), (x0, y0, x1, y1) = defects[name]
        ov = cv2.imread(str(png))[:, :, ::-1].astype(int)  # RGB, scaled by the overlay's factor
        s = ov.shape[1] / w
        red = (ov[:, :, 0] > 180) & (ov[:, :, 1] < 80) & (ov[:, :, 2] < 80)
        ys, xs = np.nonzero(red)
        assert len(xs) > 0
        assert abs(xs.min() / s - x0) < 4 and abs(xs.max() / s - x1) < 4 and abs(ys.max() / s - y1) < 4


def test_prototype_swap_tools_build_the_model_with_its_trained_class_count(trained, tmp_path, capsys):
    """A model trained on 6 classes, applied with a config saying 3 (as a protocol base model of 4 classes under
    the 6-class NEU config): register_support and predict take the class count and the pixel statistics from
    the training run, and predict names the prototype file's classes."""
    import register_support
    from steel_fsd.fewshot.prototypes import load_prototypes
    from steel_fsd.utils.cli import run_main

    protos = tmp_path / "two.pt"
    wrong = ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "DATASETS.TRAIN", "('some_other_split',)"]
    argv = ["--config-file", PROTO_CFG, "--weights", trained["weights"], "--dataset", "t_pred_train", "--shots", "1",
            "--classes", "crazing", "patches", "--out", str(protos), *TINY, *wrong]
    assert run_main(register_support.main, argv) == 0
    assert load_prototypes(str(protos)).class_names == ["crazing", "patches"]
    # --with-trained names the trained classes from the checkpoint (DATASETS.TRAIN is wrong here): adding one of
    # them again is a one-line error naming it
    capsys.readouterr()
    again = ["--with-trained" if a == "patches" else a for a in argv]
    again[again.index("--out") + 1] = str(tmp_path / "again.pt")
    assert run_main(register_support.main, again) == 2
    assert "['crazing'] already have prototypes" in capsys.readouterr().err
    import predict
    out = tmp_path / "out"
    rc = run_main(predict.main, ["--config-file", PROTO_CFG, "--weights", trained["weights"], "--prototypes", str(protos),
                                 "--input", str(trained["images"]), "--output", str(out), "--no-overlays", *TINY, *wrong])
    assert rc == 0, capsys.readouterr().err
    with open(out / "predictions.csv") as f:
        assert {r["worst_class"] for r in csv.DictReader(f)} <= {"crazing", "patches", ""}
    # 'some_other_split' is not registered: the statistics can only have come from beside the weights
    assert json.loads((out / "summary.json").read_text())["predicted"] == 3


# ----------------------------------------------------------------------------- speed options: same results
class ConvBoxModel(torch.nn.Module):
    """A stand-in detector whose box and score come out of a convolution (so autocast and the weights' memory
    format reach them): the box spans the activation-weighted centroid +- 20 px, the score is a sigmoid of the
    mean activation. It records the convolution's output dtype and input memory format."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.seen = []

    def forward(self, inputs):
        outs = []
        for d in inputs:
            x = d["image"].float()[None] / 255
            act = self.conv(x).relu().sum(1)[0] + 1e-3
            self.seen.append(act.dtype)
            ys, xs = torch.meshgrid(torch.arange(act.shape[0]), torch.arange(act.shape[1]), indexing="ij")
            cy, cx = (act * ys).sum() / act.sum(), (act * xs).sum() / act.sum()
            sy, sx = d["height"] / act.shape[0], d["width"] / act.shape[1]
            box = torch.stack([cx * sx - 20, cy * sy - 20, cx * sx + 20, cy * sy + 20])[None]
            inst = Instances((d["height"], d["width"]), pred_boxes=Boxes(box), scores=act.mean().sigmoid()[None],
                             pred_classes=torch.tensor([0]))
            outs.append({"instances": inst})
        return outs


def _images():
    return [_image(200, 200, (50, 60, 110, 90)), _image(200, 200, (10, 10, 40, 150)),
            _image(256, 1600, (230, 60, 300, 120)), _image(200, 200, (120, 20, 190, 60))]


def test_bfloat16_inference_runs_under_autocast_and_returns_float32_within_tolerance():
    images = _images()
    cfg = build_config(CFG, ["INPUT.HARMONIZE.CLAHE", "False"])
    ref_model, amp_model = ConvBoxModel(), ConvBoxModel()
    ref = Predictor(cfg, ref_model, ["a"], batch_size=3)(images)
    out = Predictor(cfg, amp_model, ["a"], batch_size=3, amp="bfloat16")(images)
    assert set(ref_model.seen) == {torch.float32} and set(amp_model.seen) == {torch.bfloat16}
    for r, o in zip(ref, out):
        assert len(r) == len(o) and o.scores.dtype == o.pred_boxes.tensor.dtype == torch.float32
        r, o = r[r.pred_boxes.tensor[:, 0].argsort()], o[o.pred_boxes.tensor[:, 0].argsort()]  # near-tied scores
        # bfloat16 keeps 8 bits of mantissa: boxes within 1.5 px on 1600-px images, scores within 0.01
        assert torch.allclose(o.pred_boxes.tensor, r.pred_boxes.tensor, atol=1.5)
        assert torch.allclose(o.scores, r.scores, atol=0.01)


def test_channels_last_changes_the_weights_layout_not_the_results():
    images = _images()
    cfg = build_config(CFG, ["INPUT.HARMONIZE.CLAHE", "False"])
    model = ConvBoxModel()
    ref = Predictor(cfg, ConvBoxModel(), ["a"], batch_size=2)(images)
    out = Predictor(cfg, model, ["a"], batch_size=2, channels_last=True)(images)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for r, o in zip(ref, out):
        assert torch.allclose(o.pred_boxes.tensor, r.pred_boxes.tensor, atol=1e-3)
        assert torch.allclose(o.scores, r.scores, atol=1e-6)


def test_prefetch_gives_identical_detections_and_rows(trained, capsys):
    """Prefetching threads (reading and harmonizing the next batches) change nothing: the same detections of a
    real model, bit for bit, and the same rows, skipped image included, in the same order."""
    from steel_fsd.inference.predict import predict_paths, prefetched
    from steel_fsd.engine.setup import finalize_config

    cfg = build_config(PROTO_CFG, TINY + ["DATASETS.TRAIN", "('t_pred_train',)"])
    finalize_config(cfg, datasets=(), weights=trained["weights"])
    bad = trained["images"] / "truncated.png"
    good = cv2.imencode(".png", _image(200, 200, (10, 10, 50, 50)))[1].tobytes()
    bad.write_bytes(good[: len(good) // 2])
    try:
        paths = find_images([str(trained["images"])])
        runs = {}
        for prefetch in (0, 2):
            pred = Predictor.from_files(cfg, trained["weights"], batch_size=2, prefetch=prefetch)
            images = [cv2.imread(p) for p in paths if not p.endswith("truncated.png")]
            direct = pred(images)  # a strip's 7 tiles make several batches of 2: prefetched within the call
            rows = [(i, p, None if inst is None else inst, e is not None)
                    for i, p, _, inst, e in predict_paths(pred, paths, progress=False)]
            runs[prefetch] = direct, rows
        (d0, r0), (d2, r2) = runs[0], runs[2]
        assert len(d0) == len(d2) == 3 and sum(len(x) for x in d0) > 0
        for a, b in zip(d0, d2):
            assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
        assert [(i, p, e) for i, p, _, e in r0] == [(i, p, e) for i, p, _, e in r2] and sum(e for *_, e in r0) == 1
        for (_, _, a, _), (_, _, b, _) in zip(r0, r2):
            assert (a is None and b is None) or torch.equal(a.scores, b.scores)
    finally:
        bad.unlink()
    # the helper itself: order kept, errors raised at their item
    assert list(prefetched(lambda x: x * x, list(range(7)), 3)) == [x * x for x in range(7)]
    with pytest.raises(ZeroDivisionError):
        list(prefetched(lambda x: 1 // (x - 4), list(range(7)), 2))


def test_predict_reads_any_valid_size_and_depth_and_skips_non_files(trained, tmp_path, capsys):
    """A thin strip, a 1x1 image and a 16-bit PNG are predicted; a FIFO named like an image is skipped and
    counted (it used to hang the run); a symlink pre-placed at an output is replaced, not written through."""
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "thin.png"), _image(30, 1600, (100, 5, 160, 25)))
    cv2.imwrite(str(folder / "dot.png"), np.full((1, 1), 200, np.uint8))
    cv2.imwrite(str(folder / "deep.png"), (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    os.mkfifo(folder / "pipe.png")
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside.csv"
    outside.write_text("keep")
    (out / "predictions.csv").symlink_to(outside)
    rc = _predict("--weights", trained["weights"], "--input", str(folder), "--output", str(out), "--allow-skips")
    assert rc == 0 and "pipe.png" in capsys.readouterr().err
    with open(out / "predictions.csv") as f:
        rows = {r["file"].split(os.sep)[-1]: r for r in csv.DictReader(f)}
    assert rows["pipe.png"]["decision"] == "skipped" and "not a regular file" in rows["pipe.png"]["error"]
    assert (rows["thin.png"]["width"], rows["thin.png"]["height"]) == ("1600", "30")
    assert (rows["dot.png"]["width"], rows["dot.png"]["height"]) == ("1", "1")
    assert rows["deep.png"]["decision"] in ("pass", "reject")
    assert outside.read_text() == "keep" and not (out / "predictions.csv").is_symlink()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 3 and summary["skipped"] == 1


class BrightMaskModel(BrightBoxModel):
    """:class:`BrightBoxModel` with a mask: the bright pixels of each input, resized to its original pixels (as a
    mask model's ``pred_masks`` after Detectron2's postprocessing)."""

    def forward(self, inputs):
        outs = super().forward(inputs)
        for d, out in zip(inputs, outs):
            bright = (d["image"].float().mean(0) > 200).float()[None, None]
            full = torch.nn.functional.interpolate(bright, size=(d["height"], d["width"]), mode="nearest")[0, 0] > 0
            out["instances"].pred_masks = full[None].expand(len(out["instances"]), -1, -1).clone()
        return outs


def test_predict_masks_rle_area_and_overlay_follow_the_defect_across_tiles(tmp_path, monkeypatch):
    """--masks: the RLE in predictions.json decodes to the defect's pixels in the original image (for a strip,
    the union of the pieces seen by the tiles), its ``area`` and detections.csv's ``mask_area`` are its pixel
    count, and the overlay is painted over the defect; a config without a mask branch is refused."""
    import predict
    from pycocotools import mask as mask_util

    from steel_fsd.inference import predict as predict_mod
    from steel_fsd.utils.cli import run_main

    monkeypatch.setattr(predict_mod.Predictor, "from_files",
                        classmethod(lambda cls, cfg, w, p=None, **kw: cls(cfg, BrightMaskModel(), ["a", "b"], **kw)))
    defects = {"square.png": ((200, 200), (50, 60, 110, 90)), "strip.png": ((256, 1600), (200, 60, 500, 120))}
    for name, (shape, box) in defects.items():
        cv2.imwrite(str(tmp_path / name), _image(*shape, box))
    def args(output):
        return ["--config-file", CFG, "--weights", "unused.pth", "--input", str(tmp_path / "*.png"), "--masks",
                "--output", str(output), "INPUT.HARMONIZE.CLAHE", "False", "INPUT.HARMONIZE.NORMALIZE", "False"]

    with pytest.raises(UserError, match="no mask branch"):
        predict.main(args(tmp_path / "refused"))
    out = tmp_path / "out"
    assert run_main(predict.main, args(out) + ["MODEL.MASK_ON", "True"]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    with open(out / "detections.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(preds) == len(rows) == 2
    for p, row in zip(preds, rows):
        (h, w), (x0, y0, x1, y1) = defects[Path(p["file_name"]).name]
        mask = mask_util.decode(p["segmentation"]).astype(bool)
        truth = np.zeros((h, w), bool)
        truth[y0:y1, x0:x1] = True
        assert mask.shape == (h, w)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.95  # resized to 200 px and back: edges move a pixel
        assert p["area"] == int(mask.sum()) == int(row["mask_area"]) and row["class"] == "b"
        assert Path(row["file"]).name == Path(p["file_name"]).name
    for png in (out / "overlays").glob("*.png"):
        (h, w), (x0, y0, x1, y1) = defects[png.name.split("_", 1)[1]]
        ov = cv2.imread(str(png))[:, :, ::-1].astype(int)
        s = ov.shape[1] / w
        inside = ov[int((y0 + 5) * s):int((y1 - 5) * s), int((x0 + 5) * s):int((x1 - 5) * s)]
        assert (inside[:, :, 2] < 200).mean() > 0.9  # white defect tinted yellow: blue drops, red and green stay
        assert (inside[:, :, 0] > 200).mean() > 0.9


def test_auto_tiling_follows_how_the_model_was_trained(trained, tmp_path):
    """A checkpoint records the tile size of its training images: a model trained on whole images is not tiled
    by "auto" (a 1600x256 image goes in whole), one trained on 256-pixel tiles is, as is one whose checkpoint
    does not say; an explicit --tile wins."""
    from steel_fsd.engine.setup import finalize_config
    from steel_fsd.modeling.checkpoint import META_KEY, checkpoint_train_tile

    payload = torch.load(trained["weights"], map_location="cpu", weights_only=False)
    assert checkpoint_train_tile(payload) == 0  # the synthetic NEU-DET images are whole images
    cfg = build_config(PROTO_CFG, TINY + ["DATASETS.TRAIN", "('t_pred_train',)"])
    finalize_config(cfg, datasets=(), weights=trained["weights"])

    def windows(weights, **kw):
        return len(Predictor.from_files(cfg, str(weights), **kw).windows(256, 1600))

    assert windows(trained["weights"]) == 1 and windows(trained["weights"], tile=256) == 7
    for meta, expected in (({"train_tile": 256}, 7), ({}, 7)):
        payload[META_KEY] = {k: v for k, v in payload[META_KEY].items() if k != "train_tile"} | meta
        path = tmp_path / f"w{len(meta)}.pth"
        torch.save(payload, path)
        assert windows(path) == expected, meta


def test_from_files_reads_the_weights_once_and_loads_them_whole(trained, monkeypatch):
    """The predictor reads its weights file once (class names, training tile and the weights themselves come
    from that one read) and the model gets every tensor of the file."""
    from steel_fsd.engine.setup import finalize_config
    from steel_fsd.inference import predict as predict_mod
    from steel_fsd.modeling import checkpoint as ckpt

    cfg = build_config(PROTO_CFG, TINY + ["DATASETS.TRAIN", "('t_pred_train',)"])
    finalize_config(cfg, datasets=(), weights=trained["weights"])
    reads, real = [], ckpt.read_weights_file
    monkeypatch.setattr(ckpt, "read_weights_file", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(predict_mod, "read_weights_file", ckpt.read_weights_file)
    pred = Predictor.from_files(cfg, trained["weights"])
    assert reads == [trained["weights"]]
    state = real(trained["weights"])["model"]
    model_state = pred.model.state_dict()
    assert set(state) <= set(model_state)
    for k, v in state.items():
        assert torch.equal(model_state[k], torch.as_tensor(v)), k
    assert pred.class_names == ckpt.checkpoint_classes(real(trained["weights"]))
