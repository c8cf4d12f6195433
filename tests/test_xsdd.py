"""X-SDD loader and registration: image-level dicts against an independent count of a fixture tree (class
folders with spaces, .jpg and .png), the stratified and seeded split, errors that name the path, the real set."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from steel_fsd.data import DatasetError, SkipLog, register_all
from steel_fsd.data.catalog import register_xsdd, steel_datasets, summary_line
from steel_fsd.data.splits import DEFAULT_RATIOS, NEGATIVE, stratified_split, stratum_keys
from steel_fsd.data.xsdd import XSDD_CLASSES, load_xsdd

SPLITS = ("train", "val", "test")
# folder -> (number of images, file extension of each); sizes vary so that height/width are checked
FIXTURE = {"red iron": (9, ".jpg"), "slag inclusion": (6, ".jpg"), "finishing roll printing": (5, ".png")}


pytestmark = pytest.mark.usefixtures("isolated_catalogs")


def _image(path, h: int, w: int) -> None:
    rng = np.random.default_rng(h * 1000 + w)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def xsdd_root(tmp_path):
    root = tmp_path / "x-sdd"
    for c, (folder, (n, ext)) in enumerate(FIXTURE.items()):
        d = root / "datas" / folder
        d.mkdir(parents=True)
        for i in range(n):
            _image(d / f"{(c + 1) * 1000 + i + 1}{ext}", 8 + i, 10 + c)
    _image(root / "datas" / "finishing roll printing" / "2999.jpg", 7, 7)  # .jpg beside the .png, as published
    (root / "readme.txt").write_text("the publishers' note\n")
    return root


def _independent_count(root) -> dict[str, tuple[str, tuple[int, int]]]:
    """``{key: (class folder, (height, width))}`` by listing the folders and decoding every image."""
    out = {}
    for folder in os.listdir(root / "datas"):
        for f in os.listdir(root / "datas" / folder):
            pixels = np.asarray(Image.open(root / "datas" / folder / f))
            out[f"{folder}/{os.path.splitext(f)[0]}"] = (folder, pixels.shape[:2])
    return out


def test_dicts_match_an_independent_count(xsdd_root):
    dicts = load_xsdd(xsdd_root)
    ref = _independent_count(xsdd_root)
    assert [d["image_key"] for d in dicts] == sorted(ref) and len(dicts) == 21
    assert [d["image_id"] for d in dicts] == list(range(1, 22))
    for d in dicts:
        folder, size = ref[d["image_key"]]
        assert set(d) == {"file_name", "image_id", "image_key", "height", "width", "annotations", "image_labels"}
        assert os.path.isabs(d["file_name"]) and os.path.isfile(d["file_name"])
        assert os.path.dirname(d["file_name"]) == str(xsdd_root / "datas" / folder)
        assert (d["height"], d["width"]) == size
        assert d["annotations"] == [] and d["image_labels"] == [XSDD_CLASSES.index(folder.replace(" ", "_"))]
    labels = Counter(XSDD_CLASSES[d["image_labels"][0]] for d in dicts)
    assert labels == {"red_iron": 9, "slag_inclusion": 6, "finishing_roll_printing": 6}
    assert {os.path.splitext(d["file_name"])[1] for d in dicts} == {".jpg", ".png"}
    # another class order gives other indices
    names = ("finishing_roll_printing", "slag_inclusion", "red_iron")
    assert {d["image_key"]: names[d["image_labels"][0]] for d in load_xsdd(xsdd_root, names)} == \
        {k: f.replace(" ", "_") for k, (f, _) in ref.items()}


def test_the_class_order_is_fixed():
    assert len(XSDD_CLASSES) == len(set(XSDD_CLASSES)) == 7
    assert XSDD_CLASSES[:3] == ("red_iron", "slag_inclusion", "finishing_roll_printing")
    assert all(c == c.lower() and " " not in c for c in XSDD_CLASSES)


def test_image_labels_stratify_the_split(xsdd_root):
    dicts = load_xsdd(xsdd_root)
    assert NEGATIVE not in stratum_keys(dicts).values()  # each image is in its class's stratum
    assert set(stratum_keys(dicts).values()) == {0, 1, 2}
    a, b = stratified_split(dicts, seed=5), stratified_split(list(reversed(load_xsdd(xsdd_root))), seed=5)
    assert {s: [d["image_key"] for d in a[s]] for s in SPLITS} == {s: [d["image_key"] for d in b[s]] for s in SPLITS}
    for c, n in Counter(d["image_labels"][0] for d in dicts).items():
        for s, r in zip(SPLITS, DEFAULT_RATIOS):
            got = sum(1 for d in a[s] if d["image_labels"] == [c])
            assert abs(got - n * r) < 1, (c, s, got, n * r)


def test_registered_splits_are_disjoint_stratified_and_seeded(xsdd_root, tmp_path):
    for s in SPLITS:
        register_xsdd(f"t_xsdd_{s}", xsdd_root, split=s, seed=3)
    splits = {s: DatasetCatalog.get(f"t_xsdd_{s}") for s in SPLITS}
    keys = [d["image_key"] for s in SPLITS for d in splits[s]]
    assert sorted(keys) == sorted(set(keys)) == sorted(_independent_count(xsdd_root))
    counts = Counter(d["image_labels"][0] for s in SPLITS for d in splits[s])
    for s, r in zip(SPLITS, DEFAULT_RATIOS):
        per_class = Counter(d["image_labels"][0] for d in splits[s])
        assert all(abs(per_class[c] - n * r) < 1 for c, n in counts.items()), (s, per_class)
    assert splits == stratified_split(load_xsdd(xsdd_root), seed=3)
    meta = MetadataCatalog.get("t_xsdd_val")
    assert meta.thing_classes == list(XSDD_CLASSES) and meta.image_level is True
    assert meta.evaluator_type != "coco" and (meta.split, meta.seed) == ("val", 3)
    assert "t_xsdd_val" in steel_datasets()
    line = summary_line("t_xsdd_train", splits["train"], XSDD_CLASSES)
    assert line.startswith("t_xsdd_train: 14 images, images per class {red_iron: 6, slag_inclusion: 4, ")
    assert "boxes" not in line and "negatives" not in line
    # register_all finds the x-sdd/ folder
    assert register_all(tmp_path) == [f"xsdd_{s}" for s in SPLITS]
    assert [d["image_key"] for d in DatasetCatalog.get("xsdd_test")] == \
        [d["image_key"] for d in stratified_split(load_xsdd(xsdd_root), seed=0)["test"]]


def test_problems_name_the_path(xsdd_root):
    datas = xsdd_root / "datas"
    (datas / "red iron" / "notes.txt").write_text("not an image")
    skips = SkipLog(strict=True)
    assert len(load_xsdd(xsdd_root, skips=skips)) == 21 and skips.counts == {"not an image": 1}  # counted
    assert "red iron/notes.txt" in skips.examples["not an image"]
    (datas / "rust").mkdir()
    _image(datas / "rust" / "1.jpg", 8, 8)
    with pytest.raises(DatasetError, match=r"datas/rust: unknown class: 'rust' is not one of"):
        load_xsdd(xsdd_root)
    lenient = SkipLog(strict=False)
    assert len(load_xsdd(xsdd_root, skips=lenient)) == 21 and lenient.counts["unknown class"] == 1
    (datas / "rust" / "1.jpg").unlink()
    (datas / "rust").rmdir()
    (datas / "slag inclusion" / "2099.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"slag inclusion/2099.jpg: unreadable image"):
        load_xsdd(xsdd_root)
    (datas / "slag inclusion" / "2099.jpg").unlink()
    _image(datas / "red iron" / "1001.png", 8, 8)  # same stem as 1001.jpg: the keys would collide
    with pytest.raises(DatasetError, match=r"red iron/1001.png: duplicate image: same stem as 1001.jpg"):
        load_xsdd(xsdd_root)


def test_truncated_image_is_found_by_the_catalogs_decode(xsdd_root):
    path = xsdd_root / "datas" / "red iron" / "1003.jpg"
    raw = path.read_bytes()
    path.write_bytes(raw[:raw.index(b"\xff\xda") + 16])  # the header (up to the scan's start) reads, the pixels do not
    assert len(load_xsdd(xsdd_root)) == 21
    register_xsdd("t_xsdd_trunc", xsdd_root)
    with pytest.raises(DatasetError, match=r"red iron/1003.jpg: unreadable image"):
        DatasetCatalog.get("t_xsdd_trunc")


def test_missing_or_empty_datas_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"datas: X-SDD folder not found"):
        load_xsdd(tmp_path)
    (tmp_path / "datas" / "red iron").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"datas: empty dataset"):
        load_xsdd(tmp_path)


def test_real_published_set():
    from conftest import SHARED_DATA

    root = SHARED_DATA / "x-sdd"
    if not (root / "datas").is_dir():
        pytest.skip(f"real data {root} not available")
    skips = SkipLog(strict=True)
    dicts = load_xsdd(root, skips=skips)
    assert len(dicts) == 1360 and not skips.counts
    counts = Counter(XSDD_CLASSES[d["image_labels"][0]] for d in dicts)
    assert counts == {"red_iron": 397, "slag_inclusion": 238, "finishing_roll_printing": 203,
                      "oxide_scale_of_temperature_system": 203, "surface_scratch": 134, "iron_sheet_ash": 122,
                      "oxide_scale_of_plate_system": 63}
    assert list(XSDD_CLASSES) == [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    assert Counter((d["height"], d["width"]) for d in dicts)[(128, 128)] == 1358  # two are 122 and 130 wide
    splits = stratified_split(dicts, seed=0)
    assert [len(splits[s]) for s in SPLITS] == [952, 206, 202]
    for s, r in zip(SPLITS, DEFAULT_RATIOS):
        per_class = Counter(XSDD_CLASSES[d["image_labels"][0]] for d in splits[s])
        assert all(abs(per_class[c] - n * r) < 1 for c, n in counts.items()), (s, per_class)
