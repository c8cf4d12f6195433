"""Severstal loader and tiler: both CSV headers, exact boxes vs brute force, RLE errors, tiles."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from steel_fsd.data.errors import DatasetError, SkipLog
from steel_fsd.data.images import read_dataset_image
from steel_fsd.data.rle import mask_components, rle_decode, rle_encode
from steel_fsd.data.severstal import (components, load_severstal, read_severstal_csv, tile_dataset_dicts,
                                      tile_positions)

SHAPE = (256, 1600)


def csv_masks(root: Path) -> dict[str, dict[int, np.ndarray]]:
    """{image stem: {category_id: mask}} read from train_v2.csv with the csv module."""
    out: dict[str, dict[int, np.ndarray]] = {}
    with open(root / "train_v2.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(Path(row["ImageId"]).stem, {})[int(row["ClassId"]) - 1] = rle_decode(row["EncodedPixels"])
    return out


def label_boxes(mask: np.ndarray) -> list[list[float]]:
    """Tight pixel-edge boxes of the 8-connected components (scipy reference), sorted."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    return sorted([float(s[1].start), float(s[0].start), float(s[1].stop), float(s[0].stop)]
                  for s in ndimage.find_objects(labels))


@pytest.fixture(scope="module")
def real(severstal_real_root):
    return load_severstal(severstal_real_root), csv_masks(severstal_real_root)


def test_both_headers_give_identical_dicts(severstal_real_root, real):
    v1 = real[0]
    v2 = load_severstal(severstal_real_root, csv_name="train_v2.csv")
    assert v1 == v2
    assert read_severstal_csv(severstal_real_root / "train.csv").keys() >= \
        read_severstal_csv(severstal_real_root / "train_v2.csv").keys()
    files = sorted(p.stem for p in (severstal_real_root / "train_images").iterdir())
    assert [d["image_key"] for d in v1] == files and [d["image_id"] for d in v1] == list(range(1, len(files) + 1))
    assert sum(not d["annotations"] for d in v1) == 5
    assert all((d["height"], d["width"]) == SHAPE for d in v1)


def test_boxes_are_the_components_and_tight(real):
    dicts, masks = real
    for d in dicts:
        by_class = masks.get(d["image_key"], {})
        assert {a["category_id"] for a in d["annotations"]} == set(by_class)
        for c, mask in by_class.items():
            anns = [a for a in d["annotations"] if a["category_id"] == c]
            assert sorted(a["bbox"] for a in anns) == label_boxes(mask)
            for a in anns:
                x0, y0, x1, y1 = map(int, a["bbox"])
                inside = mask[y0:y1, x0:x1]
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                assert a["segmentation"] and all(len(p) >= 6 for p in a["segmentation"])


def bad_rle_rows(rle: str) -> list[list[str]]:
    return [["a.jpg", "1", "1 5"], ["b.jpg", "3", "10 2 30 4"], ["b.jpg", "4", rle]]


@pytest.mark.parametrize("rle, cause", [("1 2 3", "odd number"), ("409601 3", "beyond the image"),
                                        ("5 10 8 2", "overlapping")])
def test_rle_errors_name_file_and_csv_line(severstal_tmp, rle, cause):
    path = severstal_tmp(bad_rle_rows(rle))
    with pytest.raises(DatasetError, match=cause) as e:
        load_severstal(severstal_tmp.root)
    assert (e.value.path, e.value.line) == (str(path), 4)
    assert str(e.value).startswith(f"{path}:4: bad RLE: b.jpg class 4")


def test_old_header_lines_and_non_strict_skip(severstal_tmp):
    rows = [["a.jpg_1", "1 5"], ["a.jpg_2", ""], ["b.jpg_1", ""], ["b.jpg_2", "7 3 5 1"], ["c.jpg_1", ""]]
    path = severstal_tmp(rows, header="v1")
    with pytest.raises(DatasetError, match="unsorted") as e:
        load_severstal(severstal_tmp.root)
    assert (e.value.path, e.value.line) == (str(path), 5)
    skips = SkipLog(strict=False)
    dicts = load_severstal(severstal_tmp.root, skips=skips)
    assert [(d["image_key"], d["image_id"], len(d["annotations"])) for d in dicts] == [("a", 1, 1), ("c", 3, 0)]
    assert skips.counts == {"bad RLE": 1}


@pytest.mark.parametrize("rows, cause, line", [
    ([["a.jpg", "1", "1 5"], ["a.jpg", "5", "9 2"]], "unknown class: ClassId 5", 3),
    ([["a.jpg", "1", "1 5"], ["a.jpg", "x", "9 2"]], "class id 'x' is not an integer", 3),
    ([["a.jpg", "1"]], "2 fields, expected 3", 2),
])
def test_bad_rows_name_the_line(severstal_tmp, rows, cause, line):
    path = severstal_tmp(rows)
    with pytest.raises(DatasetError, match=cause) as e:
        load_severstal(severstal_tmp.root)
    assert (e.value.path, e.value.line) == (str(path), line)


def test_wrong_header(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("ImageId,EncodedPixels\na.jpg,1 2\n")
    with pytest.raises(DatasetError) as e:
        read_severstal_csv(path)
    assert e.value.line == 1 and str(e.value).startswith(f"{path}:1:")
    assert "ImageId_ClassId,EncodedPixels" in str(e.value) and "ImageId,ClassId,EncodedPixels" in str(e.value)


def test_negatives_follow_the_csv_kind(severstal_tmp):
    root = severstal_tmp.root
    severstal_tmp([["a.jpg_1", "1 5"], ["b.jpg_1", ""]], header="v1", images=["a.jpg", "b.jpg", "extra.jpg"])
    skips = SkipLog()
    assert [(d["image_key"], bool(d["annotations"])) for d in load_severstal(root, skips=skips)] == \
        [("a", True), ("b", False)]
    assert skips.counts == {"image not in csv": 1}
    severstal_tmp([["a.jpg", "1", "1 5"]], images=["a.jpg", "b.jpg", "extra.jpg"])
    dicts = load_severstal(root, csv_name="train_v2.csv")
    assert [(d["image_key"], bool(d["annotations"])) for d in dicts] == [("a", True), ("b", False), ("extra", False)]


def test_missing_image_file(severstal_tmp):
    severstal_tmp([["a.jpg", "1", "1 5"], ["b.jpg", "1", "1 5"]], images=["a.jpg"])
    with pytest.raises(DatasetError, match="missing image") as e:
        load_severstal(severstal_tmp.root)
    assert e.value.path.endswith("b.jpg")


def test_min_area_drops_and_counts(severstal_tmp):
    mask = np.zeros(SHAPE, bool)
    mask[10:13, 40] = True          # 3 pixels
    mask[100:104, 700:705] = True   # 20 pixels
    severstal_tmp([["a.jpg", "2", rle_encode(mask)]])
    skips = SkipLog()
    (d,) = load_severstal(severstal_tmp.root, min_area=10, skips=skips)
    assert [a["bbox"] for a in d["annotations"]] == [[700.0, 100.0, 705.0, 104.0]]
    assert d["annotations"][0]["category_id"] == 1 and skips.counts == {"small component": 1}


@pytest.mark.parametrize("seed", range(4))
def test_components_equal_mask_components(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((40, 300)) < 0.25
    mask[:, rng.integers(0, 300, 40)] = False  # empty columns: several column bands
    key = lambda c: (c.bbox, c.area, c.polygons)  # noqa: E731
    got, dropped = components(mask, min_area=3)
    want = mask_components(mask)
    assert sorted(map(key, got)) == sorted(key(c) for c in want if c.area >= 3)
    assert dropped == sum(c.area < 3 for c in want) > 0 and len(got) > 5


@pytest.mark.parametrize("length, tile, overlap", [(1600, 256, 32), (256, 256, 32), (100, 256, 32),
                                                   (1000, 300, 0), (1001, 300, 50)])
def test_tile_positions_cover_with_bounded_stride(length, tile, overlap):
    xs = tile_positions(length, tile, overlap)
    size = min(tile, length)
    covered = np.zeros(length, bool)
    for x in xs:
        covered[x:x + size] = True
    assert covered.all() and xs[0] == 0 and xs[-1] + size == length
    assert all(0 < b - a <= tile - overlap for a, b in zip(xs, xs[1:]))


def test_tiles_cover_every_component_pixel(severstal_real_root, real):
    dicts, masks = real
    tiles = tile_dataset_dicts(dicts, tile=256, overlap=32)
    assert len(tiles) == 7 * len(dicts) and len({t["image_id"] for t in tiles}) == len(tiles)
    by_parent: dict[int, list[dict]] = {}
    for t in tiles:
        by_parent.setdefault(t["image_id"] // 1000, []).append(t)
        assert "_rles" not in t and (t["height"], t["width"]) == (256, 256)
        x0 = t["crop_box"][0]
        assert t["crop_box"] == [x0, 0, x0 + 256, 256] and t["image_key"].endswith(f"@{x0}")
        for a in t["annotations"]:
            bx0, by0, bx1, by1 = a["bbox"]
            assert 0 <= bx0 < bx1 <= 256 and 0 <= by0 < by1 <= 256
    for d in dicts:
        parts = by_parent[d["image_id"]]
        assert [t["crop_box"][0] for t in parts] == [0, 224, 448, 672, 896, 1120, 1344]
        assert all(t["image_key"].startswith(d["image_key"] + "@") and t["file_name"] == d["file_name"] for t in parts)
        for c, mask in masks.get(d["image_key"], {}).items():
            covered = np.zeros(SHAPE, bool)
            for t in parts:
                x0 = t["crop_box"][0]
                crop = mask[:, x0:x0 + 256]
                anns = [a for a in t["annotations"] if a["category_id"] == c]
                assert sorted(a["bbox"] for a in anns) == label_boxes(crop)  # exact per tile
                for a in anns:
                    bx0, by0, bx1, by1 = map(int, a["bbox"])
                    covered[by0:by1, x0 + bx0:x0 + bx1] = True
            assert covered[mask].all()
    tile = next(t for t in tiles if t["annotations"])
    assert read_dataset_image(tile).shape == (256, 256, 3)


def test_tiling_needs_the_masks():
    with pytest.raises(ValueError, match="_rles"):
        tile_dataset_dicts([{"file_name": "x.jpg", "image_id": 1, "height": 256, "width": 1600, "annotations": []}])


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "train_images").mkdir()
    (tmp_path / "train.csv").write_text("ImageId,ClassId,EncodedPixels\n")
    with pytest.raises(DatasetError, match=r"train.csv: empty dataset"):
        load_severstal(tmp_path)
