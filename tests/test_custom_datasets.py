"""A user's own datasets (steel_fsd.data.custom): one small set of images with known boxes, written in every
format a user may have, registered by spec or datasets file, read back box for box."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_coco_json
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from steel_fsd.data.custom import (DatasetSpec, parse_spec, read_datasets_file, register_spec,
                                   register_user_datasets)
from steel_fsd.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["dent", "scratch"]
# image stem -> [(class, x0, y0, x1, y1)] in pixel-edge coordinates; "i4" is defect-free
TRUTH = {"i0": [("dent", 4, 6, 20, 18)], "i1": [("scratch", 30, 2, 34, 40), ("dent", 2, 30, 12, 44)],
         "i2": [("scratch", 10, 10, 60, 14)], "i3": [("dent", 40, 20, 58, 30)], "i4": []}
W, H = 64, 48


def _images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in TRUTH:
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(folder / f"{stem}.jpg")


def boxes_of(dicts, classes) -> dict:
    return {Path(d["file_name"]).stem: sorted((classes[a["category_id"]], *map(round, a["bbox"]))
                                              for a in d["annotations"]) for d in dicts}


def expected(stems=TRUTH) -> dict:
    return {s: sorted(TRUTH[s]) for s in stems}


def write_coco(root: Path) -> Path:
    _images(root / "images")
    ids = {"dent": 3, "scratch": 7}  # COCO ids need not start at 0 or be contiguous
    return write_coco_json(root / "train.json", [(f"{stem}.jpg", W, H, [(ids[c], *box) for c, *box in boxes])
                                                 for stem, boxes in TRUTH.items()], ids)


def write_voc(root: Path) -> None:
    _images(root / "JPEGImages")
    (root / "Annotations").mkdir(parents=True)
    for stem, boxes in TRUTH.items():
        objs = "".join(f"<object><name>{c}</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
                       f"<ymax>{y1}</ymax></bndbox></object>" for c, x0, y0, x1, y1 in boxes)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{W}</width><height>{H}</height><depth>3</depth>"
            f"</size>{objs}</annotation>")


def write_yolo(root: Path) -> None:
    _images(root / "images")
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for stem, boxes in TRUTH.items():
        lines = []
        for c, x0, y0, x1, y1 in boxes:
            if stem == "i2":  # a segment (polygon) label: the box is its extent
                pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
                lines.append(f"{CLASSES.index(c)} " + " ".join(f"{x / W:.6f} {y / H:.6f}" for x, y in pts))
            else:
                lines.append(f"{CLASSES.index(c)} {(x0 + x1) / 2 / W:.6f} {(y0 + y1) / 2 / H:.6f} "
                             f"{(x1 - x0) / W:.6f} {(y1 - y0) / H:.6f}")
        (root / "labels" / f"{stem}.txt").write_text("\n".join(lines) + "\n")


def write_csv(root: Path) -> Path:
    _images(root / "images")
    rows = ["image,x1,y1,x2,y2,class"]
    for stem, boxes in TRUTH.items():
        rows += [f"{stem}.jpg,{x0},{y0},{x1},{y1},{c}" for c, x0, y0, x1, y1 in boxes] or [f"{stem}.jpg,,,,,"]
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    return root / "boxes.csv"


def write_masks(root: Path) -> None:
    for stem, boxes in TRUTH.items():
        if len({c for c, *_ in boxes}) > 1:
            continue  # a mask folder holds one class per image
        folder = root / (boxes[0][0] if boxes else "free")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(folder / f"{stem}.jpg")
        mask = np.zeros((H, W), np.uint8)
        for _, x0, y0, x1, y1 in boxes:
            mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(folder / f"{stem}.png")


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo", "csv", "masks"])
def test_every_format_reads_back_the_known_boxes(tmp_path, fmt):
    root = tmp_path / fmt
    ann = ""
    if fmt == "coco":
        ann = str(write_coco(root))
        path = root / "images"
    elif fmt == "voc":
        write_voc(root)
        path = root
    elif fmt == "yolo":
        write_yolo(root)
        path = root / "images"
    elif fmt == "csv":
        ann = str(write_csv(root))
        path = root / "images"
    else:
        write_masks(root)
        path = root
    name = f"t_custom_{fmt}"
    names = register_user_datasets([f"{name}={fmt}:{path}" + (f":{ann}" if ann else "")])
    assert names == [name, f"{name}_train", f"{name}_val", f"{name}_test"]
    classes = MetadataCatalog.get(name).thing_classes
    assert classes == CLASSES
    dicts = DatasetCatalog.get(name)
    stems = [s for s in TRUTH if fmt != "masks" or len({c for c, *_ in TRUTH[s]}) <= 1]
    assert boxes_of(dicts, classes) == expected(stems)
    if fmt == "yolo":
        poly = [a for d in dicts if Path(d["file_name"]).stem == "i2" for a in d["annotations"]][0]["segmentation"]
        assert np.allclose(poly[0], [10, 10, 60, 10, 60, 14, 10, 14], atol=1e-3)
    if fmt == "masks":
        assert all("segmentation" in a for d in dicts for a in d["annotations"])
    # the splits partition the images
    parts = [DatasetCatalog.get(f"{name}_{s}") for s in ("train", "val", "test")]
    assert sorted(d["image_key"] for p in parts for d in p) == sorted(d["image_key"] for d in dicts)
    # registering the same spec again is a no-op; the same name for another dataset is refused
    assert register_user_datasets([f"{name}={fmt}:{path}" + (f":{ann}" if ann else "")]) == []
    with pytest.raises(UserError, match="already registered"):
        register_spec(DatasetSpec(name, fmt, str(path), ann, split=None))


def test_datasets_file_relative_paths_classes_and_split(tmp_path):
    ann = write_coco(tmp_path / "d")
    (tmp_path / "datasets.yaml").write_text(
        "datasets:\n"
        "  - {name: t_cf_all, format: coco, path: d/images, annotations: d/train.json, split: null}\n"
        "  - {name: t_cf_s, format: coco, path: d/images, annotations: d/train.json, classes: [scratch],\n"
        "     split: [0.6, 0.2, 0.2], seed: 3}\n")
    specs = read_datasets_file(tmp_path / "datasets.yaml")
    assert specs[0].annotations == str(ann) and specs[1].split == [0.6, 0.2, 0.2] and specs[1].seed == 3
    assert register_user_datasets(files=[str(tmp_path / "datasets.yaml")]) == \
        ["t_cf_all", "t_cf_s", "t_cf_s_train", "t_cf_s_val", "t_cf_s_test"]
    assert MetadataCatalog.get("t_cf_s").thing_classes == ["scratch"]
    only = boxes_of(DatasetCatalog.get("t_cf_s"), ["scratch"])
    assert only == {s: sorted(b for b in TRUTH[s] if b[0] == "scratch") for s in TRUTH}


@pytest.mark.parametrize("text, match", [
    ("nameonly", "NAME=FORMAT:PATH"),
    ("a=coco", "NAME=FORMAT:PATH"),
    ("a=pdf:/x", "unknown format 'pdf'"),
    ("a b=voc:/x", "not a plain name"),
    ("a=coco:/x", "needs its annotation file"),
])
def test_malformed_specs_are_refused_with_the_way_forward(text, match):
    with pytest.raises(UserError, match=match):
        parse_spec(text)


def test_bad_files_and_paths_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        register_user_datasets([f"t_bad1=voc:{tmp_path / 'missing'}"])
    (tmp_path / "f.yaml").write_text("datasets:\n  - {name: x, format: voc, path: ., colour: red}\n")
    with pytest.raises(UserError, match=r"unknown keys \['colour'\]"):
        read_datasets_file(tmp_path / "f.yaml")
    (tmp_path / "g.yaml").write_text("datasets:\n  - {name: x, format: voc, path: ., split: [1, 2]}\n")
    with pytest.raises(UserError, match="three non-negative fractions"):
        read_datasets_file(tmp_path / "g.yaml")
    write_yolo(tmp_path / "y")
    (tmp_path / "y" / "labels" / "i0.txt").write_text("0 0.5 0.5 2.0 0.1\n")  # not normalized
    register_user_datasets([f"t_bad_yolo=yolo:{tmp_path / 'y' / 'images'}"])
    with pytest.raises(ValueError, match=r"i0.txt:1: bad label line: coordinates must be normalized"):
        DatasetCatalog.get("t_bad_yolo")


def test_train_net_trains_on_a_dataset_given_on_the_command_line(tmp_path):
    ann = write_coco(tmp_path / "d")
    env = dict(os.environ, STEEL_FSD_DATASETS=str(tmp_path / "none"))
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
         str(REPO / "configs" / "demo" / "faster_rcnn_R18_FPN_synth_neu.yaml"),
         "--dataset", f"plates=coco:{tmp_path / 'd' / 'images'}:{ann}",
         "DATASETS.TRAIN", "('plates',)", "DATASETS.TEST", "('plates',)", "MODEL.ROI_HEADS.NUM_CLASSES", "2",
         "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2", "INPUT.HARMONIZE.RESIZE", "64",
         "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "1", "OUTPUT_DIR", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "plates: 5 images, boxes per class {dent: 3, scratch: 2}, 1 negatives" in res.stdout + res.stderr
    assert (tmp_path / "out" / "inference" / "plates" / "coco_instances_results.json").is_file()
