from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

from steel_fsd.data.coco import to_coco, write_coco

CLASSES = ["scratch", "pit", "patch"]
SEVERSTAL_ROOT = Path("/work/shared/data/severstal")


def make_dicts(root: Path) -> list[dict]:
    """Hand-built dicts: box-only, polygon, XYWH-mode and negative images (ids out of order)."""
    def img(key, image_id, anns):
        return {"file_name": str(root / f"{key}.png"), "image_id": image_id, "image_key": key,
                "height": 40, "width": 60, "annotations": anns}
    xyxy = BoxMode.XYXY_ABS
    return [
        img("b", 2, [{"bbox": [0.0, 0.0, 60.0, 40.0], "bbox_mode": xyxy, "category_id": 2, "iscrowd": 0,
                      "difficult": 1},
                     {"bbox": [10.5, 3.0, 12.0, 9.5], "bbox_mode": xyxy, "category_id": 0, "iscrowd": 0}]),
        img("a", 1, [{"bbox": [5.0, 6.0, 25.0, 16.0], "bbox_mode": xyxy, "category_id": 1, "iscrowd": 0,
                      "segmentation": [[5, 6, 25, 6, 25, 16, 5, 16], [30, 0, 40, 0, 30, 8]]}]),
        img("c", 3, []),
        img("d", 4, [{"bbox": [1.0, 2.0, 3.0, 4.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2, "iscrowd": 0}]),
    ]


def xyxy(ann: dict) -> list[float]:
    return BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)


def test_to_coco_fields(tmp_path):
    dicts = make_dicts(tmp_path)
    coco = to_coco(dicts, CLASSES, "toy_train")
    assert [c["name"] for c in coco["categories"]] == CLASSES
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert [i["id"] for i in coco["images"]] == [1, 2, 3, 4]  # negative image "c" kept
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == list(range(1, 5))
    by_img = {}
    for a in anns:
        by_img.setdefault(a["image_id"], []).append(a)
    for d in dicts:
        got = by_img.get(d["image_id"], [])
        assert len(got) == len(d["annotations"])
        for src, a in zip(d["annotations"], got):
            x0, y0, x1, y1 = xyxy(src)
            assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert a["category_id"] == src["category_id"] + 1
            if "segmentation" in src:
                assert a["area"] == pytest.approx(20 * 10 + 10 * 8 / 2)  # both polygons, shoelace
            else:
                assert a["area"] == (x1 - x0) * (y1 - y0)
    assert by_img[2][0]["difficult"] == 1 and "difficult" not in by_img[2][1]
    assert coco["info"] == {"description": "toy_train", "version": "1.0"}  # no timestamp
    assert to_coco(dicts, CLASSES, "toy_train") == coco  # reproducible
    assert not [n for n in DatasetCatalog.list() if n.startswith("__steel_fsd")]  # nothing left registered


def test_round_trip_pycocotools_and_detectron2(tmp_path):
    dicts = make_dicts(tmp_path)
    path = tmp_path / "out" / "toy.json"
    write_coco(path, to_coco(dicts, CLASSES, "toy", image_root=tmp_path))
    assert json.loads(path.read_text())["images"][0]["file_name"] == "a.png"

    api = COCO(str(path))
    assert sorted(api.getImgIds()) == [1, 2, 3, 4]
    assert api.getAnnIds(imgIds=[3]) == []
    assert len(api.getAnnIds(imgIds=[2])) == 2
    assert [c["name"] for c in api.loadCats(api.getCatIds())] == CLASSES

    name = "steel_fsd_test_coco_round_trip"
    register_coco_instances(name, {}, str(path), str(tmp_path))
    try:
        loaded = {d["image_id"]: d for d in DatasetCatalog.get(name)}
        assert MetadataCatalog.get(name).thing_classes == CLASSES
        assert sorted(loaded) == [1, 2, 3, 4]
        for src in dicts:
            got = loaded[src["image_id"]]
            assert got["file_name"] == src["file_name"]
            assert (got["height"], got["width"]) == (src["height"], src["width"])
            assert [xyxy(a) for a in got["annotations"]] == [xyxy(a) for a in src["annotations"]]
            assert [a["category_id"] for a in got["annotations"]] == [a["category_id"] for a in src["annotations"]]
            for a, s in zip(got["annotations"], src["annotations"]):
                if "segmentation" in s:
                    assert a["segmentation"] == [[float(v) for v in p] for p in s["segmentation"]]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_rejects_tiles_and_bad_input(tmp_path):
    dicts = make_dicts(tmp_path)
    with pytest.raises(ValueError, match="crop_box"):
        to_coco([dict(dicts[0], crop_box=[0, 0, 20, 20])], CLASSES, "tiled")
    with pytest.raises(ValueError, match="category_id 3"):
        to_coco([dict(dicts[2], annotations=[dict(dicts[0]["annotations"][0], category_id=3)])], CLASSES, "x")
    with pytest.raises(ValueError, match="duplicate image_id"):
        to_coco([dicts[0], dict(dicts[2], image_id=dicts[0]["image_id"])], CLASSES, "x")
    with pytest.raises(ValueError, match="polygon"):
        rle = dict(dicts[1]["annotations"][0], segmentation={"size": [40, 60], "counts": "xyz"})
        to_coco([dict(dicts[1], annotations=[rle])], CLASSES, "x")


def test_real_severstal_round_trip(tmp_path):
    sev = pytest.importorskip("steel_fsd.data.severstal")
    if not SEVERSTAL_ROOT.is_dir():
        pytest.skip("real Severstal sample not available")
    dicts = sev.load_severstal(str(SEVERSTAL_ROOT))
    path = tmp_path / "sev.json"
    write_coco(path, to_coco(dicts, list(sev.SEVERSTAL_CLASSES), "severstal"))
    api = COCO(str(path))
    assert len(api.getImgIds()) == len(dicts)
    assert len(api.getAnnIds()) == sum(len(d["annotations"]) for d in dicts)
    assert sum(1 for d in dicts if not d["annotations"]) == sum(1 for i in api.getImgIds() if not api.getAnnIds(imgIds=[i]))
    name = "steel_fsd_test_coco_severstal"
    register_coco_instances(name, {}, str(path), "")
    try:
        loaded = {d["image_id"]: d for d in DatasetCatalog.get(name)}
        for src in dicts:
            got = loaded[src["image_id"]]["annotations"]
            np.testing.assert_allclose(np.reshape([xyxy(a) for a in got], (-1, 4)),
                                       np.reshape([xyxy(a) for a in src["annotations"]], (-1, 4)), atol=1e-9)
            assert [a["category_id"] for a in got] == [a["category_id"] for a in src["annotations"]]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_a_split_without_any_box_exports_and_loads(tmp_path):
    """A split of negatives only (a small folder, a Severstal CSV without defects): an empty annotation list,
    which pycocotools loads, instead of a missing key."""
    dicts = [d for d in make_dicts(tmp_path) if not d["annotations"]]
    coco = to_coco(dicts, CLASSES, "negatives")
    assert coco["annotations"] == [] and len(coco["images"]) == 1
    path = tmp_path / "neg.json"
    write_coco(path, coco)
    assert COCO(str(path)).getAnnIds() == []
