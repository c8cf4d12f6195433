"""Magnetic-tile loader and registration: components, boxes and areas against an independent labelling
(scipy.ndimage), the counted drops, the defect-free negatives in every split, and the real published layout."""
from __future__ import annotations

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_util
from scipy import ndimage

from steel_fsd.data import SkipLog
from steel_fsd.data.catalog import register_magnetic_tile
from steel_fsd.data.errors import DatasetError
from steel_fsd.data.magnetic_tile import MASK_THRESHOLD, MIN_AREA, MT_CLASSES, load_magnetic_tile, read_mask
from steel_fsd.data.splits import NEGATIVE, stratum_keys
from steel_fsd.fewshot.support import annotation_sources


def _write(root, folder: str, stem: str, mask: np.ndarray, image: bool = True) -> None:
    d = root / folder / "Imgs"
    d.mkdir(parents=True, exist_ok=True)
    if image:
        rng = np.random.default_rng(abs(hash(stem)) % 2**32)
        Image.fromarray(rng.integers(0, 255, mask.shape, dtype=np.uint8)).save(d / f"{stem}.jpg")
    Image.fromarray(mask.astype(np.uint8)).save(d / f"{stem}.png")


def _soft_mask(shape, blobs, speck=None) -> np.ndarray:
    """A mask with soft (compressed-looking) edges: 255 inside each (y0, x0, y1, x1) blob, values 1-254 in a
    one-pixel ring around it, and an optional (y, x) speck of value 200 (one pixel)."""
    m = np.zeros(shape, np.uint8)
    for y0, x0, y1, x1 in blobs:
        m[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = np.maximum(m[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1], 90)
        m[y0:y1, x0:x1] = 255
    if speck is not None:
        m[speck] = 200
    return m


def _reference(mask_png) -> list[tuple[list[float], int]]:
    """(box in pixel edges, area) of each 8-connected component >= MIN_AREA pixels, by scipy.ndimage."""
    binary = np.asarray(Image.open(mask_png)) >= MASK_THRESHOLD
    labels, n = ndimage.label(binary, structure=np.ones((3, 3)))
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        area = int((labels == i).sum())
        if area >= MIN_AREA:
            out.append(([float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop)], area))
    return sorted(out)


@pytest.fixture
def mt_root(tmp_path):
    root = tmp_path / "magnetic-tile"
    _write(root, "MT_Blowhole", "a1", _soft_mask((60, 80), [(10, 10, 20, 22)], speck=(50, 70)))
    _write(root, "MT_Blowhole", "a2", _soft_mask((70, 50), [(5, 5, 9, 9), (30, 20, 45, 40)]))
    _write(root, "MT_Crack", "c1", _soft_mask((40, 90), [(2, 3, 38, 6), (20, 50, 22, 89)]))
    _write(root, "MT_Uneven", "u1", np.where(np.eye(30, 40) > 0, 100, 0))  # only values below the threshold
    _write(root, "MT_Free", "f1", np.zeros((50, 50)))
    _write(root, "MT_Free", "f2", np.zeros((30, 60)))
    return root


def test_components_boxes_and_areas_match_an_independent_labelling(mt_root):
    skips = SkipLog(strict=True)
    dicts = load_magnetic_tile(mt_root, skips=skips)
    by_key = {d["image_key"]: d for d in dicts}
    assert sorted(by_key) == ["MT_Blowhole/a1", "MT_Blowhole/a2", "MT_Crack/c1", "MT_Free/f1", "MT_Free/f2"]
    for key, cls in (("MT_Blowhole/a1", "blowhole"), ("MT_Blowhole/a2", "blowhole"), ("MT_Crack/c1", "crack")):
        d = by_key[key]
        ref = _reference(mt_root / (key.replace("/", "/Imgs/") + ".png"))
        got = sorted((a["bbox"], int(a["area"])) for a in d["annotations"])
        assert got == ref and len(got) >= 1
        assert {a["category_id"] for a in d["annotations"]} == {MT_CLASSES.index(cls)}
        h, w = d["height"], d["width"]
        assert (h, w) == np.asarray(Image.open(d["file_name"])).shape
        # the polygons lie on the component; rasterized, a blob's overlaps its thresholded mask by IoU > 0.5
        # (contours run through pixel centres, so a 4x4 blob rasterizes to 3x3: IoU 9/16; a 2-px-wide crack
        # keeps about half its pixels, the polygon format's known loss on thin defects)
        binary = read_mask(d["mask_file"])
        for a in d["annotations"]:
            poly = mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))).astype(bool)
            x0, y0, x1, y1 = (int(v) for v in a["bbox"])
            comp = np.zeros_like(binary)
            comp[y0:y1, x0:x1] = binary[y0:y1, x0:x1]
            assert poly.any() and not (poly & ~comp).any()
            if min(x1 - x0, y1 - y0) >= 4:
                assert (poly & comp).sum() / (poly | comp).sum() > 0.5
    # the threshold: the soft ring (value 90) is not defect, so the blob's box is exactly the 255 region
    assert by_key["MT_Blowhole/a1"]["annotations"][0]["bbox"] == [10.0, 10.0, 22.0, 20.0]
    assert by_key["MT_Free/f1"]["annotations"] == [] and by_key["MT_Free/f2"]["annotations"] == []
    # one speck (1 px) and the 4x4 blob (16 px) is kept; the uneven image has no pixel >= 128
    assert skips.counts == {"small component": 1, "empty mask": 1}


def test_problems_name_the_file(mt_root):
    _write(mt_root, "MT_Free", "bad", _soft_mask((20, 20), [(2, 2, 10, 10)]))
    with pytest.raises(DatasetError, match=r"MT_Free/Imgs/bad.png: defect in a defect-free mask"):
        load_magnetic_tile(mt_root)
    skips = SkipLog(strict=False)
    (mt_root / "MT_Crack" / "Imgs" / "c1.png").unlink()
    (mt_root / "MT_Rust" / "Imgs").mkdir(parents=True)
    dicts = load_magnetic_tile(mt_root, skips=skips)
    assert skips.counts["defect in a defect-free mask"] == 1 and skips.counts["missing mask"] == 1
    assert skips.counts["unknown class"] == 1
    assert "MT_Rust" in skips.examples["unknown class"]
    assert [d["image_key"] for d in dicts] == ["MT_Blowhole/a1", "MT_Blowhole/a2", "MT_Free/f1", "MT_Free/f2"]
    (mt_root / "MT_Rust" / "Imgs").rmdir()
    (mt_root / "MT_Rust").rmdir()
    (mt_root / "MT_Free" / "Imgs" / "bad.png").unlink()
    rgb = mt_root / "MT_Blowhole" / "Imgs" / "a1.png"
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(rgb)
    with pytest.raises(DatasetError, match="a1.png: bad mask: mask must be an 8-bit single-channel image"):
        load_magnetic_tile(mt_root)


def test_registered_splits_keep_negatives_and_partition_the_set(tmp_path):
    root = tmp_path / "magnetic-tile"
    rng = np.random.default_rng(0)
    for i in range(20):
        cls = ("Blowhole", "Crack")[i % 2]
        y, x = rng.integers(2, 30, 2)
        _write(root, f"MT_{cls}", f"d{i:02d}", _soft_mask((40, 40), [(y, x, y + 6, x + 5)]))
        _write(root, "MT_Free", f"f{i:02d}", np.zeros((40, 40)))
    names = [f"test_mt_{s}" for s in ("train", "val", "test")]
    for name, s in zip(names, ("train", "val", "test")):
        register_magnetic_tile(name, root, split=s, seed=3)
    try:
        splits = {n: DatasetCatalog.get(n) for n in names}
        keys = [d["image_key"] for n in names for d in splits[n]]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 40
        for n in names:  # the defect-free images are a stratum of their own: each split keeps its share
            negatives = sum(1 for d in splits[n] if not d["annotations"])
            assert negatives == {"test_mt_train": 14, "test_mt_val": 3, "test_mt_test": 3}[n]
        assert MetadataCatalog.get(names[0]).thing_classes == list(MT_CLASSES)
        assert set(stratum_keys(splits[names[2]]).values()) >= {NEGATIVE}
        assert len(annotation_sources(root)) == 40  # the masks are the annotation files (protocol digests)
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_real_published_layout():
    from conftest import SHARED_DATA

    root = SHARED_DATA / "magnetic-tile"
    if not root.is_dir():
        pytest.skip(f"real data sample {root} not available")
    skips = SkipLog(strict=True)
    dicts = load_magnetic_tile(root, skips=skips)
    pngs = sorted(root.glob("MT_*/Imgs/*.png"))
    defect_pngs = [p for p in pngs if p.parent.parent.name != "MT_Free"]
    free = [d for d in dicts if d["image_key"].startswith("MT_Free/")]
    assert len(free) == len(pngs) - len(defect_pngs) and all(not d["annotations"] for d in free)
    # every defect mask is either loaded with exactly its reference components or counted as empty
    loaded = {d["image_key"]: d for d in dicts if not d["image_key"].startswith("MT_Free/")}
    empty = 0
    for png in defect_pngs:
        ref = _reference(png)
        key = f"{png.parent.parent.name}/{png.stem}"
        if not ref:
            empty += 1
            assert key not in loaded
            continue
        assert sorted((a["bbox"], int(a["area"])) for a in loaded[key]["annotations"]) == ref
    assert skips.counts["empty mask"] == empty
    assert len(dicts) == len(pngs) - empty
