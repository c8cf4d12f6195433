"""Synthetic NEU-DET / Severstal generator: formats, determinism, tight boxes, RLE round trips."""
from __future__ import annotations

import csv
import filecmp
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
from PIL import Image

from steel_fsd.synthetic import generators as S
from steel_fsd.data.rle import rle_decode, rle_encode
from steel_fsd.utils.cli import UserError

NEU_PER_CLASS = 2
SEV_IMAGES = 10


@pytest.fixture(scope="module")
def neu_dir(tmp_path_factory) -> Path:
    return S.make_neu_synthetic(tmp_path_factory.mktemp("neu"), n_per_class=NEU_PER_CLASS, seed=3)


@pytest.fixture(scope="module")
def sev_dir(tmp_path_factory) -> Path:
    return S.make_severstal_synthetic(tmp_path_factory.mktemp("sev"), n_images=SEV_IMAGES, seed=3,
                                      negative_fraction=0.3)


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def same_trees(a: Path, b: Path) -> bool:
    files = tree_files(a)
    return files == tree_files(b) and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def bbox_brute(mask: np.ndarray) -> tuple[int, int, int, int]:
    """1-based inclusive box by scanning rows and columns one by one."""
    rows = [y for y in range(mask.shape[0]) if mask[y].any()]
    cols = [x for x in range(mask.shape[1]) if mask[:, x].any()]
    return cols[0] + 1, rows[0] + 1, cols[-1] + 1, rows[-1] + 1


def read_v1(path: Path) -> dict[tuple[str, int], str]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["ImageId_ClassId", "EncodedPixels"]
        return {(key.rsplit("_", 1)[0], int(key.rsplit("_", 1)[1])): rle for key, rle in reader}


# ----------------------------------------------------------------------------- determinism

def test_neu_same_seed_is_byte_identical_and_other_seed_differs(neu_dir, tmp_path):
    again = S.make_neu_synthetic(tmp_path / "again", n_per_class=NEU_PER_CLASS, seed=3)
    assert same_trees(neu_dir, again)
    other = S.make_neu_synthetic(tmp_path / "other", n_per_class=NEU_PER_CLASS, seed=4)
    assert tree_files(other) == tree_files(neu_dir)
    differing = [f for f in tree_files(neu_dir) if f.endswith(".jpg")
                 and not filecmp.cmp(neu_dir / f, other / f, shallow=False)]
    assert len(differing) == 6 * NEU_PER_CLASS


def test_severstal_same_seed_is_byte_identical_and_other_seed_differs(sev_dir, tmp_path):
    again = S.make_severstal_synthetic(tmp_path / "again", n_images=SEV_IMAGES, seed=3, negative_fraction=0.3)
    assert same_trees(sev_dir, again)
    other = S.make_severstal_synthetic(tmp_path / "other", n_images=SEV_IMAGES, seed=4, negative_fraction=0.3)
    assert not set(tree_files(other)) & set(tree_files(sev_dir)) - {"train.csv"}  # other image ids
    assert (other / "train.csv").read_bytes() != (sev_dir / "train.csv").read_bytes()


def test_more_images_only_append():
    small, large = S.severstal_image_ids(5, 4), S.severstal_image_ids(5, 9)
    assert large[:4] == small and len(set(large)) == 9
    assert all(len(i) == 13 and i.endswith(".jpg") and int(i[:9], 16) >= 0 for i in large)
    a, b = S.render_neu_image(5, 2, 7), S.render_neu_image(5, 2, 7)
    assert np.array_equal(a.image, b.image) and len(a.defects) == len(b.defects)


# ----------------------------------------------------------------------------- NEU format and boxes

def test_neu_layout_and_voc_files(neu_dir):
    names = [f"{c}_{n}" for c in S.NEU_CLASSES for n in range(1, NEU_PER_CLASS + 1)]
    assert sorted(p.stem for p in (neu_dir / "IMAGES").iterdir()) == sorted(names)
    assert sorted(p.stem for p in (neu_dir / "ANNOTATIONS").iterdir()) == sorted(names)
    labels = set()
    for ci, cls in enumerate(S.NEU_CLASSES):
        for n in range(1, NEU_PER_CLASS + 1):
            img = Image.open(neu_dir / "IMAGES" / f"{cls}_{n}.jpg")
            assert (img.format, img.size, img.mode) == ("JPEG", (200, 200), "RGB")
            rgb = np.asarray(img)
            assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
            root = ET.parse(neu_dir / "ANNOTATIONS" / f"{cls}_{n}.xml").getroot()
            assert root.tag == "annotation"
            assert root.findtext("folder") == S.NEU_FOLDERS[ci]
            assert root.findtext("filename") == f"{cls}_{n}.jpg"
            assert root.findtext("source/database") == "NEU-DET"
            assert [root.findtext(f"size/{k}") for k in ("width", "height", "depth")] == ["200", "200", "1"]
            objects = root.findall("object")
            assert 1 <= len(objects) <= 4
            assert [o.findtext("name") for o in objects].count(cls) >= len(objects) - 1  # mostly its class
            for o in objects:
                labels.add(o.findtext("name"))
                assert [o.findtext(k) for k in ("pose", "truncated", "difficult")] == ["Unspecified", "0", "0"]
                x0, y0, x1, y1 = (int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
                assert 1 <= x0 <= x1 <= 200 and 1 <= y0 <= y1 <= 200
    assert labels == set(S.NEU_CLASSES)


def test_neu_boxes_are_the_tight_boxes_of_the_drawn_defects(neu_dir):
    for ci, cls in enumerate(S.NEU_CLASSES):
        sample = S.render_neu_image(3, ci, 1)
        root = ET.parse(neu_dir / "ANNOTATIONS" / f"{cls}_1.xml").getroot()
        written = [tuple(int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
                   for o in root.findall("object")]
        assert written == [bbox_brute(d.mask) for d in sample.defects]
        assert [o.findtext("name") for o in root.findall("object")] == [d.label for d in sample.defects]
        # the defects change the image inside their masks, and nothing outside them
        union = np.logical_or.reduce([d.mask for d in sample.defects])
        assert np.array_equal(sample.image[~union], sample.background[~union])
        for d in sample.defects:
            assert np.mean(sample.image[d.mask] != sample.background[d.mask]) > 0.9
        # the JPEG on disk is that image (up to compression)
        disk = np.asarray(Image.open(neu_dir / "IMAGES" / f"{cls}_1.jpg").convert("L"), dtype=float)
        assert np.abs(disk - sample.image).mean() < 3


def test_neu_defects_are_visible_against_the_texture():
    """Each class's defect pixels differ from the background by several times the grain's spread."""
    for ci in range(len(S.NEU_CLASSES)):
        for n in (1, 2, 3):
            s = S.render_neu_image(0, ci, n)
            union = np.logical_or.reduce([d.mask for d in s.defects])
            change = np.abs(s.image.astype(float) - s.background)[union].mean()
            grain = np.abs(np.diff(s.background.astype(float), axis=1)).mean()
            assert change > 1.5 * grain, (S.NEU_CLASSES[ci], n, change, grain)


def test_mask_voc_box_matches_brute_force_and_rejects_empty():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((37, 53)) < rng.uniform(0.001, 0.05)
        if mask.any():
            assert S.mask_voc_box(mask) == bbox_brute(mask)
    with pytest.raises(ValueError):
        S.mask_voc_box(np.zeros((5, 5), bool))


# ----------------------------------------------------------------------------- Severstal

def test_severstal_csv_round_trips_the_rendered_masks(sev_dir):
    rows = read_v1(sev_dir / "train.csv")
    plan = S.severstal_plan(3, SEV_IMAGES, 0.3)
    assert sorted(rows) == sorted((image_id, c) for image_id, _ in plan for c in (1, 2, 3, 4))
    for index, (image_id, class_ids) in enumerate(plan):
        img = Image.open(sev_dir / "train_images" / image_id)
        assert (img.format, img.size, img.mode) == ("JPEG", (1600, 256), "RGB")
        sample = S.render_severstal_image(3, index, class_ids)
        masks = {S.SEVERSTAL_CLASSES.index(d.label) + 1: d.mask for d in sample.defects}
        assert sorted(masks) == list(class_ids)
        for c in (1, 2, 3, 4):
            if c in masks:
                assert np.array_equal(rle_decode(rows[image_id, c]), masks[c])
            else:
                assert rows[image_id, c] == ""
        if len(masks) == 2:  # class masks never overlap
            a, b = masks.values()
            assert not (a & b).any()


def test_severstal_class_coverage_and_negative_fraction(sev_dir):
    rows = read_v1(sev_dir / "train.csv")
    present = {c for (_, c), rle in rows.items() if rle}
    assert present == {1, 2, 3, 4}
    by_image: dict[str, list[str]] = {}
    for (image_id, _), rle in rows.items():
        by_image.setdefault(image_id, []).append(rle)
    negatives = [i for i, rles in by_image.items() if not any(rles)]
    assert len(by_image) == SEV_IMAGES and len(negatives) == 3  # round(0.3 * 10)


def test_severstal_v2_header_holds_the_same_masks(sev_dir, tmp_path):
    v2 = S.make_severstal_synthetic(tmp_path, n_images=SEV_IMAGES, seed=3, negative_fraction=0.3, header="v2")
    with open(v2 / "train.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["ImageId", "ClassId", "EncodedPixels"]
        v2_rows = {(i, int(c)): r for i, c, r in reader}
    assert v2_rows == {k: r for k, r in read_v1(sev_dir / "train.csv").items() if r}
    with pytest.raises(ValueError):
        S.make_severstal_synthetic(tmp_path / "bad", n_images=1, header="v3")


def test_severstal_looks_different_from_neu():
    neu = np.mean([S.render_neu_image(0, ci, 1).background.mean() for ci in range(6)])
    sev = np.mean([S.render_severstal_image(0, i, ()).background[:, 600:1000].mean() for i in range(6)])
    assert neu - sev > 15


# ----------------------------------------------------------------------------- csv-only benchmark writer

def test_csv_only_counts_rles_and_hard_links(tmp_path):
    out = S.make_severstal_csv_only(tmp_path / "train.csv", n_images=40, n_masks=55, seed=1,
                                    image_dir=tmp_path / "train_images")
    rows = read_v1(out)
    ids = {i for i, _ in rows}
    assert len(rows) == 160 and len(ids) == 40
    rles = [r for r in rows.values() if r]
    assert len(rles) == 55
    for rle in rles:
        mask = rle_decode(rle)
        assert mask.any() and rle_encode(mask) == rle  # valid and canonical
    files = sorted((tmp_path / "train_images").iterdir())
    assert sorted(f.name for f in files) == sorted(ids)
    assert len({f.stat().st_ino for f in files}) == 1 and files[0].stat().st_nlink == 40
    assert Image.open(files[0]).size == (1600, 256)
    capped = S.make_severstal_csv_only(tmp_path / "capped.csv", n_images=2, n_masks=100)
    assert sum(1 for r in read_v1(capped).values() if r) == 8


# ----------------------------------------------------------------------------- real loaders and the tool

def test_real_loaders_read_the_synthetic_sets(neu_dir, sev_dir):
    pytest.importorskip("detectron2")
    from steel_fsd.data.neu import NEU_CLASSES, load_neu_voc
    from steel_fsd.data.severstal import SEVERSTAL_CLASSES, load_severstal
    assert (NEU_CLASSES, SEVERSTAL_CLASSES) == (S.NEU_CLASSES, S.SEVERSTAL_CLASSES)
    neu = load_neu_voc(neu_dir)
    assert len(neu) == 6 * NEU_PER_CLASS
    first = next(d for d in neu if d["image_key"] == "crazing_1")
    expected = [S.mask_voc_box(d.mask) for d in S.render_neu_image(3, 0, 1).defects]
    assert [a["bbox"] for a in first["annotations"]] == [[x0 - 1, y0 - 1, x1, y1] for x0, y0, x1, y1 in expected]
    sev = load_severstal(sev_dir)
    assert len(sev) == SEV_IMAGES and sum(not d["annotations"] for d in sev) == 3


def test_tool_writes_skips_and_regenerates(tmp_path, capsys):
    tool = load_tool("make_synthetic")
    args = ["--out", str(tmp_path), "--neu-per-class", "1", "--severstal-images", "2"]
    tool.main(args)
    for name in ("neu-synth", "severstal-synth"):
        assert "SYNTHETIC" in (tmp_path / name / "README.txt").read_text()
        assert (tmp_path / name / "synthetic.json").is_file()
    assert len(list((tmp_path / "neu-synth" / "IMAGES").iterdir())) == 6
    stamp = os.stat(tmp_path / "neu-synth" / "IMAGES" / "crazing_1.jpg").st_mtime_ns
    capsys.readouterr()
    tool.main(args)
    assert capsys.readouterr().out.count("up to date") == 2
    assert os.stat(tmp_path / "neu-synth" / "IMAGES" / "crazing_1.jpg").st_mtime_ns == stamp
    tool.main(["--out", str(tmp_path), "--neu-per-class", "2", "--only", "neu"])
    assert "regenerating" in capsys.readouterr().out
    assert len(list((tmp_path / "neu-synth" / "IMAGES").iterdir())) == 12
    foreign = tmp_path / "x" / "neu-synth"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(UserError, match="not made by this tool"):
        tool.main(["--out", str(tmp_path / "x"), "--only", "neu", "--neu-per-class", "1"])
    assert (foreign / "keep.txt").is_file()
