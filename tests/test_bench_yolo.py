"""benchmarks/yolo_export.py: dataset dicts -> YOLO label lines and back, tiles as real images (no Ultralytics)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from yolo_export import (XYWH_ABS, XYXY_ABS, export_split, image_stem, label_lines,  # noqa: E402
                         parse_label_lines, write_data_yaml, yolo_line)

from steel_fsd.data.images import read_dataset_image  # noqa: E402

NAMES = ["a", "b", "c"]


def _ann(box, cid, mode=XYXY_ABS, **kw):
    return {"bbox": list(box), "bbox_mode": mode, "category_id": cid, "iscrowd": 0, **kw}


def test_label_line_matches_hand_computation():
    d = {"image_id": 1, "width": 200, "height": 100,
         "annotations": [_ann((20, 10, 60, 50), 2), _ann((100, 0, 50, 100), 0, XYWH_ABS)]}
    # box 1: cx = 40/200, cy = 30/100, w = 40/200, h = 40/100; box 2 (XYWH): x 100..150, y 0..100
    assert label_lines(d) == ["2 0.200000 0.300000 0.200000 0.400000", "0 0.625000 0.500000 0.250000 1.000000"]


def test_round_trip_back_to_pixels():
    boxes = [(3.0, 7.0, 91.0, 40.0, 1), (0.0, 0.0, 256.0, 256.0, 2), (120.5, 33.25, 130.0, 255.0, 0)]
    d = {"image_id": 7, "width": 256, "height": 256, "annotations": [_ann(b[:4], b[4]) for b in boxes]}
    back = parse_label_lines(label_lines(d), 256, 256)
    assert [c for c, *_ in back] == [b[4] for b in boxes]
    np.testing.assert_allclose([xy for _, *xy in back], [b[:4] for b in boxes], atol=256 * 1e-6)


def test_crowd_skipped_boxes_clipped_and_empty_dropped():
    d = {"image_id": 1, "width": 100, "height": 50,
         "annotations": [_ann((-10, -5, 50, 60), 0), _ann((10, 10, 20, 20), 1, iscrowd=1),
                         _ann((120, 0, 130, 10), 2), _ann((30, 30, 30, 40), 2)]}
    assert label_lines(d) == ["0 0.250000 0.500000 0.500000 1.000000"]
    assert yolo_line(0, (5, 5, 5, 9), 10, 10) is None


def test_export_writes_tiles_labels_index_and_yaml(tmp_path):
    strip = (np.arange(40 * 100 * 3) % 251).astype(np.uint8).reshape(40, 100, 3)
    src = tmp_path / "strip.jpg"   # PNG bytes under a .jpg name, as some Severstal files
    Image.fromarray(strip).save(src, format="PNG")
    tiles = [{"file_name": str(src), "image_id": 10 + i, "image_key": f"strip@{x0}", "height": 40, "width": 40,
              "crop_box": [x0, 0, x0 + 40, 40],
              "annotations": [_ann((5, 10, 25, 30), i)] if i < 2 else []}  # tile coordinates, as Severstal tiles
             for i, x0 in enumerate((0, 40, 60))]
    root = tmp_path / "yolo"
    index = export_split(tiles, NAMES, root, "train", read_dataset_image)
    assert [v["image_key"] for v in index.values()] == ["strip@0", "strip@40", "strip@60"]
    for d in tiles:
        png = root / "images" / "train" / f"{image_stem(d)}.png"
        x0 = d["crop_box"][0]
        np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), strip[:, x0:x0 + 40])
        assert index[str(png)]["image_id"] == d["image_id"]
        lines = (root / "labels" / "train" / f"{image_stem(d)}.txt").read_text().splitlines()
        assert lines == ([f"{d['annotations'][0]['category_id']} 0.375000 0.500000 0.500000 0.500000"]
                         if d["annotations"] else [])
    assert json.loads((root / "index_train.json").read_text()) == index
    text = write_data_yaml(root, NAMES, "train", "val").read_text()
    assert "train: images/train\nval: images/val\n" in text and '  2: "c"' in text


def test_export_rejects_bad_class_and_size(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    d = {"file_name": str(img), "image_id": 1, "height": 8, "width": 8, "annotations": [_ann((0, 0, 4, 4), 3)]}
    with pytest.raises(ValueError, match="category_id 3"):
        export_split([d], NAMES, tmp_path / "o", "t", read_dataset_image)
    with pytest.raises(ValueError, match="8x8"):
        export_split([dict(d, annotations=[], height=9)], NAMES, tmp_path / "o", "t", lambda d: np.zeros((8, 8, 3), np.uint8))
