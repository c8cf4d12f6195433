"""The support layer: K-shot manifests seeded, canonical, consistent with sample_support, disjoint from
evaluation; hand-written support lists read through the same reader."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from steel_fsd.data import register_neu
from steel_fsd.data.splits import sha256_files
from steel_fsd.fewshot.support import (annotation_sources, assert_disjoint, entries_from_list, kshot_manifest,
                                    load_manifest, manifest_support_dicts, sample_support, write_manifest)
from steel_fsd.synthetic import make_neu_synthetic
from steel_fsd.utils.cli import run_main

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "prepare_fewshot.py"
_spec = importlib.util.spec_from_file_location("prepare_fewshot", SCRIPT)
prepare_fewshot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_fewshot)

SHA = "0" * 64
TRAIN, TEST = "t_kshot_neu_train", "t_kshot_neu_test"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A 36-image synthetic NEU under ``<tmp>/neu``, registered as TRAIN and TEST splits; returns ``<tmp>``."""
    base = tmp_path_factory.mktemp("kshot")
    make_neu_synthetic(base / "neu", n_per_class=6, seed=0)
    register_neu(TRAIN, base / "neu", split="train")
    register_neu(TEST, base / "neu", split="test")
    return base


def _box(cat: int, x: float = 1.0, crowd: int = 0) -> dict:
    return {"bbox": [x, 2.0, x + 10.0, 20.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": cat, "iscrowd": crowd}


def _hand_dicts() -> list[dict]:
    """Class 0: 5 boxes (3 in image b); class 1: 2 boxes plus a crowd box; image e has no boxes."""
    return [{"image_key": "a", "image_id": 1, "annotations": [_box(0), _box(1)]},
            {"image_key": "b", "image_id": 2, "annotations": [_box(0, 1), _box(0, 30), _box(0, 60), _box(1, 90, crowd=1)]},
            {"image_key": "c", "image_id": 3, "annotations": [_box(0)]},
            {"image_key": "d", "image_id": 4, "annotations": [_box(1)]},
            {"image_key": "e", "image_id": 5, "annotations": []}]


def _picks(m: dict) -> list[tuple[str, int]]:
    return [(e["image_key"], e["annotation_index"]) for e in m["supports"]]


def _run(out: Path, *extra: str) -> int:
    return run_main(prepare_fewshot.main, ["--dataset", TRAIN, "--shots", "1", "3", "--seeds", "0", "1", "--out", str(out),
                                 *extra])


def test_cli_writes_byte_identical_manifests(synth, tmp_path, capsys):
    args = ("--eval-dataset", TEST, "--datasets-root", str(synth))
    assert _run(tmp_path / "a", *args) == 0
    assert _run(tmp_path / "b", *args) == 0
    files = {p.name: p.read_bytes() for p in sorted((tmp_path / "a").iterdir())}
    assert set(files) == {f"{TRAIN}_{k}shot_seed{s}.json" for k in (1, 3) for s in (0, 1)}
    assert files == {p.name: p.read_bytes() for p in sorted((tmp_path / "b").iterdir())}
    assert all(b.endswith(b"}\n") and b"created" not in b and str(synth).encode() not in b for b in files.values())
    m = load_manifest(tmp_path / "a" / f"{TRAIN}_3shot_seed1.json")
    assert (m["dataset"], m["shots"], m["seed"]) == (TRAIN, 3, 1)
    assert m["class_names"] == list(MetadataCatalog.get(TRAIN).thing_classes)
    xmls = sorted((synth / "neu" / "ANNOTATIONS").glob("*.xml"))
    assert len(xmls) == 36 and annotation_sources(synth / "neu") == xmls
    assert m["source_sha256"] == sha256_files(xmls)["sha256"]
    assert capsys.readouterr().out.count(f"{TRAIN} K=3 seed=1:") == 2


def test_cli_refuses_supports_in_eval_split(synth, tmp_path, capsys):
    assert _run(tmp_path / "out", "--eval-dataset", TRAIN) == 2
    assert not (tmp_path / "out").exists()
    assert "support images are in the evaluation split" in capsys.readouterr().err


def test_manifest_agrees_with_sample_support(synth):
    dicts, names = DatasetCatalog.get(TRAIN), MetadataCatalog.get(TRAIN).thing_classes
    for shots in (1, 5):
        for seed in (0, 1, 2):
            m = kshot_manifest(dicts, names, shots, seed, SHA, TRAIN)
            want = sample_support(dicts, len(names), shots, seed)
            assert _picks(m) == [(d["image_key"], i) for d, i in want]
            assert [e["bbox"] for e in m["supports"]] == [[float(v) for v in d["annotations"][i]["bbox"]]
                                                          for d, i in want]


def test_different_seeds_give_different_supports(synth):
    dicts, names = DatasetCatalog.get(TRAIN), MetadataCatalog.get(TRAIN).thing_classes
    picks = [_picks(kshot_manifest(dicts, names, 3, seed, SHA, TRAIN)) for seed in (0, 1, 2)]
    assert picks[0] != picks[1] and picks[0] != picks[2] and picks[1] != picks[2]
    assert picks[0] == _picks(kshot_manifest(list(reversed(dicts)), names, 3, 0, SHA, TRAIN))


def test_exactly_k_per_class_and_shortfall():
    m = kshot_manifest(_hand_dicts(), ["dent", "scratch"], 3, 0, SHA, "hand")
    per_class = [e["class"] for e in m["supports"]]
    assert per_class.count("dent") == 3 and per_class.count("scratch") == 2
    assert m["counts"] == {"dent": {"available": 5, "selected": 3, "shortfall": 0},
                           "scratch": {"available": 2, "selected": 2, "shortfall": 1}}
    assert ("b", 3) not in _picks(m)  # the crowd box is never a support
    assert "instances (boxes) per class" in m["rule"] and "other boxes are not used" in m["rule"]
    with pytest.raises(ValueError, match=r"\['rare'\] have no annotated instance"):
        kshot_manifest(_hand_dicts(), ["dent", "scratch", "rare"], 1, 0, SHA, "hand")


def test_supports_disjoint_from_test_split(synth):
    m = kshot_manifest(DatasetCatalog.get(TRAIN), MetadataCatalog.get(TRAIN).thing_classes, 5, 0, SHA, TRAIN)
    assert_disjoint(m, DatasetCatalog.get(TEST))
    key = m["supports"][0]["image_key"]
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        assert_disjoint(m, [{"image_key": key, "image_id": 0, "annotations": []}])
    tiles = dict(m, supports=[dict(m["supports"][0], image_key="strip7@224")])
    with pytest.raises(ValueError, match="'strip7'"):  # a tile and its whole strip are the same image
        assert_disjoint(tiles, [{"image_key": "strip7", "image_id": 0, "annotations": []}])


def test_tampered_or_truncated_manifest_names_the_file(tmp_path):
    path = tmp_path / "m.json"
    write_manifest(path, kshot_manifest(_hand_dicts(), ["dent", "scratch"], 2, 0, SHA, "hand"))
    good = path.read_text()
    assert load_manifest(path)["counts"]["dent"]["selected"] == 2
    path.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{path} is not valid JSON") + r".*m\.json:\d+"):
        load_manifest(path)
    tampered = json.loads(good)
    tampered["supports"].pop()
    path.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*disagree with its 1 support"):
        load_manifest(path)
    del tampered["source_sha256"]
    path.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*missing field 'source_sha256'"):
        load_manifest(path)


def test_manifest_support_dicts_round_trip(synth, tmp_path):
    dicts, names = DatasetCatalog.get(TRAIN), MetadataCatalog.get(TRAIN).thing_classes
    path = tmp_path / "m.json"
    write_manifest(path, kshot_manifest(dicts, names, 2, 1, SHA, TRAIN))
    m = load_manifest(path)
    sub = manifest_support_dicts(m, dicts)
    boxes = sorted((d["image_key"], a["category_id"], tuple(a["bbox"])) for d in sub for a in d["annotations"])
    assert boxes == sorted((e["image_key"], e["category_id"], tuple(e["bbox"])) for e in m["supports"])
    # register_support drawing K from the restricted dicts gets exactly the manifest's boxes, whatever its seed
    again = kshot_manifest(sub, names, 2, 7, SHA, TRAIN)
    assert sorted((e["image_key"], tuple(e["bbox"])) for e in again["supports"]) == \
        sorted((e["image_key"], tuple(e["bbox"])) for e in m["supports"])
    first = m["supports"][0]
    with pytest.raises(ValueError, match=re.escape(repr(first["image_key"]))):
        manifest_support_dicts(m, [d for d in dicts if d["image_key"] != first["image_key"]])
    moved = dict(m, supports=[dict(first, bbox=[0.0, 0.0, 1.0, 1.0])] + m["supports"][1:])
    with pytest.raises(ValueError, match=re.escape(f"{first['image_key']}[{first['annotation_index']}]")):
        manifest_support_dicts(moved, dicts)


def test_hand_written_list_goes_through_the_manifest_reader(synth):
    """{image_key} names every box of the image, {image_key, bbox} one box (matched to 2 decimals); the
    entries are manifest entries, so manifest_support_dicts reads them; mistakes name the list and entry."""
    dicts, names = DatasetCatalog.get(TRAIN), MetadataCatalog.get(TRAIN).thing_classes
    many = next(d for d in dicts if len(d["annotations"]) >= 2)
    other = next(d for d in dicts if d["image_key"] != many["image_key"])
    box = other["annotations"][-1]["bbox"]
    entries = entries_from_list([{"image_key": many["image_key"]},
                                 {"image_key": other["image_key"], "bbox": [v + 0.001 for v in box]}],
                                dicts, names, "sup.json")
    assert [(e["image_key"], e["annotation_index"]) for e in entries] == \
        [(many["image_key"], i) for i in range(len(many["annotations"]))] + \
        [(other["image_key"], len(other["annotations"]) - 1)]
    assert all(names[e["category_id"]] == e["class"] for e in entries)
    sub = {d["image_key"]: d for d in manifest_support_dicts({"supports": entries}, dicts)}
    assert sub[many["image_key"]]["annotations"] == many["annotations"]
    assert sub[other["image_key"]]["annotations"] == [other["annotations"][-1]]
    with pytest.raises(ValueError, match=r"sup\.json: entry 0: image_key 'nope' is not in the dataset"):
        entries_from_list([{"image_key": "nope"}], dicts, names, "sup.json")
    with pytest.raises(ValueError, match=r"sup\.json: entry 1: no box \[0, 0, 1, 1\]"):
        entries_from_list([{"image_key": many["image_key"]}, {"image_key": many["image_key"], "bbox": [0, 0, 1, 1]}],
                          dicts, names, "sup.json")
    with pytest.raises(ValueError, match=r"sup\.json: expected a JSON list"):
        entries_from_list({"image_key": "x"}, dicts, names, "sup.json")
