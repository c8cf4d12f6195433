"""Detectron2 registration: names, laziness, idempotence, shared loads, splits, tiles and unions."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import steel_fsd.data.catalog as catalog
from steel_fsd.data import (NEU_CLASSES, SEVERSTAL_CLASSES, DatasetError, register_all, register_neu,
                            register_severstal)

SPLITS = ("train", "val", "test")


pytestmark = pytest.mark.usefixtures("isolated_catalogs")


@pytest.fixture
def datasets_root(tmp_path, neu_real_root, severstal_real_root):
    """A datasets root whose real and synthetic folders link to the real samples."""
    for folder, target in (("neu-det", neu_real_root), ("severstal", severstal_real_root),
                           ("neu-synth", neu_real_root), ("severstal-synth", severstal_real_root)):
        (tmp_path / folder).symlink_to(target, target_is_directory=True)
    return tmp_path


def expected_names() -> set[str]:
    prefixes = ["neu", "neu_synth", "severstal", "severstal_synth", "severstal_tiled", "severstal_synth_tiled",
                "steel_mixed", "steel_mixed_synth"]
    return {f"{p}_{s}" for p in prefixes for s in SPLITS}


def test_register_all_names_metadata_and_idempotence(datasets_root):
    assert set(register_all(datasets_root)) == expected_names()
    assert register_all(datasets_root) == []
    assert set(DatasetCatalog.list()) == expected_names()
    for s in SPLITS:
        meta = MetadataCatalog.get(f"neu_{s}")
        assert meta.thing_classes == list(NEU_CLASSES) and meta.evaluator_type == "coco"
        assert (meta.dataset_root, meta.split, meta.seed) == (str(datasets_root / "neu-det"), s, 0)
        assert MetadataCatalog.get(f"severstal_tiled_{s}").thing_classes == list(SEVERSTAL_CLASSES)
        assert MetadataCatalog.get(f"severstal_tiled_{s}").tile == 256 and meta.tile is None  # what predict tiles
        mixed = MetadataCatalog.get(f"steel_mixed_synth_{s}")
        assert mixed.thing_classes == list(NEU_CLASSES + SEVERSTAL_CLASSES) and mixed.split == s
        assert mixed.dataset_root == str(datasets_root)


def test_splits_share_one_load_and_partition_the_data(datasets_root, monkeypatch, caplog):
    calls = []

    def counting(loader):
        def wrapped(*args, **kwargs):
            calls.append(loader.__name__)
            return loader(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(catalog, "load_neu_voc", counting(catalog.load_neu_voc))
    monkeypatch.setattr(catalog, "load_severstal", counting(catalog.load_severstal))
    register_all(datasets_root)
    assert calls == []  # lazy
    with caplog.at_level(logging.INFO, logger="steel_fsd"):
        neu = {s: DatasetCatalog.get(f"neu_{s}") for s in SPLITS}
        sev = {s: DatasetCatalog.get(f"severstal_{s}") for s in SPLITS}
        tiled = {s: DatasetCatalog.get(f"severstal_tiled_{s}") for s in SPLITS}
    assert calls == ["load_neu_voc", "load_severstal"]
    assert f"neu_train: {len(neu['train'])} images, boxes per class {{crazing: " in caplog.text
    assert "severstal_val:" in caplog.text and "(all splits): no skips" in caplog.text

    keys = [d["image_key"] for s in SPLITS for d in neu[s]]
    assert len(keys) == len(set(keys)) == 1440
    lines = (datasets_root / "severstal" / "train.csv").read_text().splitlines()[1:]
    strips = len({line.split(",")[0].rpartition("_")[0] for line in lines if line.strip()})  # 4 rows per image
    assert sum(len(v) for v in sev.values()) == strips
    assert all("_rles" not in d for v in sev.values() for d in v)
    assert sum(len(v) for v in tiled.values()) == 7 * strips
    for s in SPLITS:  # whole strips are split, then tiled
        assert {t["image_id"] // 1000 for t in tiled[s]} == {d["image_id"] for d in sev[s]}


def test_gets_return_fresh_copies(datasets_root):
    register_all(datasets_root)
    first = DatasetCatalog.get("neu_val")
    first[0]["annotations"].clear()
    first.pop()
    again = DatasetCatalog.get("neu_val")
    assert len(again) == len(first) + 1 and again[0]["annotations"]


def test_union_offsets_classes_and_image_ids(datasets_root):
    register_all(datasets_root)
    neu, sev = DatasetCatalog.get("neu_test"), DatasetCatalog.get("severstal_test")
    mixed = DatasetCatalog.get("steel_mixed_test")
    assert len(mixed) == len(neu) + len(sev)
    assert [d["image_id"] for d in mixed] == [d["image_id"] for d in neu] + [d["image_id"] + 10**7 for d in sev]
    n = len(NEU_CLASSES)
    assert [a["category_id"] for d in mixed for a in d["annotations"]] == \
        [a["category_id"] for d in neu for a in d["annotations"]] + \
        [a["category_id"] + n for d in sev for a in d["annotations"]]


def test_absent_and_default_roots(tmp_path, monkeypatch, datasets_root):
    assert register_all(tmp_path / "nowhere") == []
    monkeypatch.setenv("STEEL_FSD_DATASETS", str(datasets_root))
    assert set(register_all()) == expected_names()
    monkeypatch.delenv("STEEL_FSD_DATASETS")
    monkeypatch.chdir(datasets_root.parent)
    (datasets_root.parent / "datasets").symlink_to(datasets_root)
    DatasetCatalog.clear()
    MetadataCatalog.clear()
    assert set(register_all()) == expected_names()
    assert MetadataCatalog.get("neu_train").dataset_root == str(datasets_root.parent / "datasets" / "neu-det")


def test_registration_is_lazy_and_errors_surface_on_load(tmp_path):
    (tmp_path / "neu-det").mkdir()
    assert set(register_all(tmp_path)) == {f"neu_{s}" for s in SPLITS}
    with pytest.raises(DatasetError, match="no NEU-DET annotations"):
        DatasetCatalog.get("neu_train")


def test_direct_registration(neu_real_root, severstal_real_root, tmp_path):
    register_neu("neu_all_two", neu_real_root, class_names=NEU_CLASSES)
    assert len(DatasetCatalog.get("neu_all_two")) == 1440
    assert MetadataCatalog.get("neu_all_two").split == "all"
    register_severstal("sev_tiles", severstal_real_root, split=None, tile=256)
    strips = len(list((severstal_real_root / "train_images").iterdir()))
    assert len(DatasetCatalog.get("sev_tiles")) == 7 * strips  # a 1600-px strip: 7 tiles of 256 with 32 overlap
    with pytest.raises(ValueError, match="split"):
        register_neu("bad_split", neu_real_root, split="training")
    with pytest.raises(FileNotFoundError):
        register_severstal("nowhere", tmp_path / "nowhere")
    with pytest.raises(AssertionError):
        register_neu("neu_all_two", neu_real_root)


@pytest.mark.parametrize("root", ["real", "missing"])
def test_import_registers_model_components_only(tmp_path, neu_real_root, root):
    """Importing steel_fsd registers the prototype head and no dataset, whether or not
    $STEEL_FSD_DATASETS holds data; register_all() then registers them."""
    repo = str(Path(__file__).resolve().parents[1])
    data = str(Path(neu_real_root).parent) if root == "real" else str(tmp_path / "missing")
    env = dict(os.environ, STEEL_FSD_DATASETS=data,
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    code = ("import steel_fsd, steel_fsd.data as d; from detectron2.data import DatasetCatalog; "
            "from detectron2.modeling import ROI_HEADS_REGISTRY; "
            "ours = lambda: sorted(n for n in DatasetCatalog.list() if n.startswith(('neu', 'severstal', 'steel'))); "
            "print(ours(), 'PrototypeROIHeads' in ROI_HEADS_REGISTRY); d.register_all(); print(ours())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first == "[] True"
    assert (second == "[]") == (root == "missing")
    if root == "real":
        assert "'neu_train'" in second


def test_neu_folds_register_three_splits_per_fold_whose_tests_partition_the_images(neu_real_root):
    from steel_fsd.data.catalog import neu_fold_names, register_neu_folds

    new = register_neu_folds(neu_real_root, 3)
    assert sorted(new) == sorted(n for f in range(3) for n in neu_fold_names(3, f).values())
    assert register_neu_folds(neu_real_root, 3) == []  # idempotent
    tested = []
    for f in range(3):
        names = neu_fold_names(3, f)
        parts = {s: {d["image_key"] for d in DatasetCatalog.get(n)} for s, n in names.items()}
        assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"]) \
            and not (parts["val"] & parts["test"])
        assert MetadataCatalog.get(names["test"]).fold == [f, 3]
        tested += sorted(parts["test"])
        every = parts["train"] | parts["val"] | parts["test"]  # the same images in every fold
    assert sorted(tested) == sorted(every) and len(every) > 10  # each image tested once
