"""NEU-DET VOC loader: the real sample, both layouts, and bad input in strict and non-strict mode."""
from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import voc_xml, write_image
from detectron2.structures import BoxMode

from steel_fsd.data.errors import DatasetError, SkipLog
from steel_fsd.data.neu import NEU_CLASSES, load_neu_voc

OBJECT = re.compile(r"<object>(.*?)</object>", re.S)


def reference_objects(xml_text: str) -> list[tuple[str, list[float], int]]:
    """(name, pixel-edge box, difficult) of each object, by regex (independent of the loader's parser)."""
    out = []
    for block in OBJECT.findall(xml_text):
        def tag(t):
            return re.search(rf"<{t}>\s*(.*?)\s*</{t}>", block).group(1)
        xmin, ymin, xmax, ymax = (float(tag(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        out.append((tag("name"), [xmin - 1, ymin - 1, xmax, ymax], int(tag("difficult"))))
    return out


def line_of(text: str, needle: str, occurrence: int = 0) -> int:
    """1-based line of the ``occurrence``-th line containing ``needle``."""
    return [i for i, line in enumerate(text.splitlines(), 1) if needle in line][occurrence]


@pytest.fixture(scope="module")
def neu_real(neu_real_root):
    t0 = time.perf_counter()
    skips = SkipLog(strict=True)
    dicts = load_neu_voc(neu_real_root, skips=skips)
    return dicts, skips, time.perf_counter() - t0


def test_real_sample_matches_regex_reference(neu_real, neu_real_root):
    dicts, skips, seconds = neu_real
    assert len(dicts) == 1440 and not skips.counts
    assert seconds < 2.0, f"loading 1,440 XML files took {seconds:.2f} s"
    keys = sorted(p.stem for p in (neu_real_root / "ANNOTATIONS").glob("*.xml"))
    assert [d["image_key"] for d in dicts] == keys
    assert [d["image_id"] for d in dicts] == list(range(1, 1441))
    for d in dicts:
        assert Path(d["file_name"]) == neu_real_root / "IMAGES" / f"{d['image_key']}.jpg"
        assert (d["height"], d["width"]) == (200, 200)
        ref = reference_objects((neu_real_root / "ANNOTATIONS" / f"{d['image_key']}.xml").read_text())
        got = [(NEU_CLASSES[a["category_id"]], a["bbox"], a["difficult"]) for a in d["annotations"]]
        assert got == ref, d["image_key"]
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 200
            assert a["bbox_mode"] == BoxMode.XYXY_ABS and a["iscrowd"] == 0
    classes = Counter(NEU_CLASSES[a["category_id"]] for d in dicts for a in d["annotations"])
    assert set(classes) == set(NEU_CLASSES)


def test_real_sample_quirks(neu_real, neu_real_root):
    dicts = {d["image_key"]: d for d in neu_real[0]}
    inclusion = NEU_CLASSES.index("inclusion")
    mixed = sorted(k for k, d in dicts.items() if k.startswith("scratches_")
                   and any(a["category_id"] == inclusion for a in d["annotations"]))
    # the XML <name> is the label, not the file name
    want = sorted(p.stem for p in (neu_real_root / "ANNOTATIONS").glob("scratches_*.xml")
                  if "<name>inclusion</name>" in p.read_text())
    assert mixed == want and "scratches_108" in mixed
    a, b = dicts["patches_101"], dicts["patches_105"]
    assert a["image_id"] != b["image_id"] and a["file_name"] != b["file_name"]
    assert [x["bbox"] for x in a["annotations"]] != [x["bbox"] for x in b["annotations"]]
    assert sum(x["difficult"] for d in dicts.values() for x in d["annotations"]) > 0


def test_filename_without_extension_and_other_formats(neu_tmp):
    neu_tmp("a_1", [("crazing", 1, 1, 10, 10)], filename="a_1")  # image a_1.jpg
    neu_tmp("a_2", [("patches", 5, 6, 7, 8, 1)], filename="a_2", image="a_2.png")
    neu_tmp("a_3", [("scratches", 1, 1, 2, 2)], filename="something_else", image="a_3.bmp")  # falls back to the stem
    dicts = {d["image_key"]: d for d in load_neu_voc(neu_tmp.root)}
    assert Path(dicts["a_1"]["file_name"]).name == "a_1.jpg"
    assert Path(dicts["a_2"]["file_name"]).name == "a_2.png"
    assert Path(dicts["a_3"]["file_name"]).name == "a_3.bmp"
    ann = dicts["a_2"]["annotations"][0]
    assert ann["bbox"] == [4.0, 5.0, 7.0, 8.0] and ann["category_id"] == 2 and ann["difficult"] == 1


def test_border_boxes_clipped_and_zero_area_dropped(neu_tmp, caplog):
    neu_tmp("b", [("crazing", -4, 3, 20, 30), ("inclusion", 190, 195, 230, 260),
                  ("patches", 11, 5, 10, 9), ("scratches", 50, 50, 60, 60)])
    skips = SkipLog(strict=True)
    (d,) = load_neu_voc(neu_tmp.root, skips=skips)
    assert [a["bbox"] for a in d["annotations"]] == [[0.0, 2.0, 20.0, 30.0], [189.0, 194.0, 200.0, 200.0],
                                                     [49.0, 49.0, 60.0, 60.0]]
    assert [a["category_id"] for a in d["annotations"]] == [0, 1, 5]
    assert skips.counts == {"clipped box": 2, "zero-area box": 1}
    assert "zero-area box" in caplog.text and "b.xml" in caplog.text


def test_malformed_xml_names_file_and_line(neu_tmp):
    text = voc_xml("m.jpg", [("crazing", 1, 1, 5, 5)]).replace("</bndbox>", "</bndbx>")
    path = neu_tmp("m", xml=text)
    with pytest.raises(DatasetError, match="malformed XML") as e:
        load_neu_voc(neu_tmp.root)
    assert e.value.path == str(path) and e.value.line == line_of(text, "</bndbx>")
    assert str(e.value).startswith(f"{path}:{e.value.line}:")


def test_unknown_class_names_the_line_of_its_object(neu_tmp):
    text = voc_xml("u.jpg", [("crazing", 1, 1, 5, 5), ("rust", 2, 2, 9, 9)])
    path = neu_tmp("u", xml=text)
    with pytest.raises(DatasetError, match="unknown class: 'rust'") as e:
        load_neu_voc(neu_tmp.root)
    assert e.value.path == str(path) and e.value.line == line_of(text, "<object>", 1)


@pytest.mark.parametrize("objects, size, image, reason", [
    ([("crazing", 1, 1, 5, 5)], (200, 200), False, "missing image"),
    ([("crazing", 201, 10, 230, 20)], (200, 200), True, "box out of bounds"),
    ([("crazing", 10, 10, 5, 20)], (200, 200), True, "inverted box"),
    ([("crazing", 1, "a", 5, 20)], (200, 200), True, "bad box"),
    ([("crazing", 1, "nan", 5, 20)], (200, 200), True, "bad box: non-finite coordinate"),
    ([("crazing", 1, 1, "inf", 20)], (200, 200), True, "bad box: non-finite coordinate"),
])
def test_bad_input_raises_in_strict_mode(neu_tmp, objects, size, image, reason):
    path = neu_tmp("x", objects, size=size, image=image)
    with pytest.raises(DatasetError, match=reason) as e:
        load_neu_voc(neu_tmp.root)
    assert e.value.path == str(path)


def test_missing_size_reads_image_header(neu_tmp):
    neu_tmp("s", [("crazing", 1, 1, 30, 20)], size=None, image=False)
    write_image(neu_tmp.root / "IMAGES" / "s.jpg", width=37, height=23)
    neu_tmp("z", [("crazing", 1, 1, 5, 5)], size=(0, 0), image=False)
    write_image(neu_tmp.root / "IMAGES" / "z.jpg", width=11, height=12)
    dicts = {d["image_key"]: d for d in load_neu_voc(neu_tmp.root)}
    assert (dicts["s"]["width"], dicts["s"]["height"]) == (37, 23)
    assert (dicts["z"]["width"], dicts["z"]["height"]) == (11, 12)


def test_non_strict_mode_counts_and_keeps_the_good(neu_tmp):
    neu_tmp("good", [("crazing", 1, 1, 5, 5)])
    neu_tmp("bad_xml", xml="<annotation><filename>bad_xml.jpg</filename>\n<object>")
    neu_tmp("no_image", [("crazing", 1, 1, 5, 5)], image=False)
    neu_tmp("partial", [("rust", 1, 1, 5, 5), ("patches", 1, 1, 5, 5), ("crazing", 300, 300, 310, 310)])
    skips = SkipLog(strict=False)
    dicts = load_neu_voc(neu_tmp.root, skips=skips)
    assert [d["image_key"] for d in dicts] == ["good", "partial"]
    assert [d["image_id"] for d in dicts] == [2, 4]  # ids follow the sorted keys of all files
    assert [a["category_id"] for a in dicts[1]["annotations"]] == [2]
    assert skips.counts == {"malformed XML": 1, "missing image": 1, "unknown class": 1, "box out of bounds": 1}
    assert "bad_xml.xml:2" in skips.examples["malformed XML"]


def test_nested_train_validation_layout(neu_real_root, tmp_path):
    picked = {"train": ["crazing_1", "scratches_108"], "validation": ["patches_101", "patches_105"]}
    for split, stems in picked.items():
        (tmp_path / split / "annotations").mkdir(parents=True)
        for stem in stems:
            shutil.copy(neu_real_root / "ANNOTATIONS" / f"{stem}.xml", tmp_path / split / "annotations")
            cls = stem.rsplit("_", 1)[0]
            (tmp_path / split / "images" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(neu_real_root / "IMAGES" / f"{stem}.jpg", tmp_path / split / "images" / cls)
    nested = load_neu_voc(tmp_path)
    stems = sorted(s for v in picked.values() for s in v)
    flat = load_neu_voc(neu_real_root, files=[f"ANNOTATIONS/{s}.xml" for s in stems])
    assert [d["image_key"] for d in nested] == stems
    assert [d["annotations"] for d in nested] == [d["annotations"] for d in flat]
    for d in nested:
        split = next(s for s, v in picked.items() if d["image_key"] in v)
        assert Path(d["file_name"]) == (tmp_path / split / "images" / d["image_key"].rsplit("_", 1)[0]
                                        / f"{d['image_key']}.jpg")


def test_root_without_annotations_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no NEU-DET annotations"):
        load_neu_voc(tmp_path)


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "ANNOTATIONS").mkdir()
    (tmp_path / "IMAGES").mkdir()
    with pytest.raises(DatasetError, match="empty dataset"):
        load_neu_voc(tmp_path)
