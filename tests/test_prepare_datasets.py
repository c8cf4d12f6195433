from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from steel_fsd.data.errors import SkipLog
from steel_fsd.data.images import verify_images
from steel_fsd.data.splits import SPLITS, verify_manifest
from steel_fsd.utils import cli

neu = pytest.importorskip("steel_fsd.data.neu")
severstal = pytest.importorskip("steel_fsd.data.severstal")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "prepare_datasets.py"
SHARED = Path("/work/shared/data")
SEVERSTAL_ROOT = SHARED / "severstal"
pytestmark = pytest.mark.skipif(not (SHARED / "neu-det").is_dir() or not SEVERSTAL_ROOT.is_dir(),
                                reason="real data samples not available")

_spec = importlib.util.spec_from_file_location("prepare_datasets", SCRIPT)
prepare_datasets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_datasets)


@pytest.fixture(scope="module")
def neu_root(tmp_path_factory) -> Path:
    """60 real NEU images (10 per class) with their XML, in the flat IMAGES/ + ANNOTATIONS/ layout."""
    root = tmp_path_factory.mktemp("neu")
    for sub in ("IMAGES", "ANNOTATIONS"):
        (root / sub).mkdir()
    for cls in neu.NEU_CLASSES:
        for n in range(1, 11):
            shutil.copy(SHARED / "neu-det" / "IMAGES" / f"{cls}_{n}.jpg", root / "IMAGES")
            shutil.copy(SHARED / "neu-det" / "ANNOTATIONS" / f"{cls}_{n}.xml", root / "ANNOTATIONS")
    return root


def run_main(*args: str) -> int:
    return cli.run_main(prepare_datasets.main, [str(a) for a in args])


def out_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_script_end_to_end(neu_root, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--neu", str(neu_root), "--severstal", str(SEVERSTAL_ROOT),
                           "--out", str(out), "--seed", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "crazing" in proc.stdout and "defect_1" in proc.stdout and "total" in proc.stdout
    expected = {f"{n}_{s}.json" for n in ("neu", "severstal") for s in SPLITS} | {"splits.json"}
    assert set(out_files(out)) == expected

    manifests = json.loads((out / "splits.json").read_text())
    sources = {"neu": sorted(neu_root.rglob("*.xml")),
               "severstal": [SEVERSTAL_ROOT / "train.csv"]}  # the loader prefers train.csv
    loaded = {"neu": (neu_root, neu.load_neu_voc(str(neu_root)), neu.NEU_CLASSES),
              "severstal": (SEVERSTAL_ROOT, severstal.load_severstal(str(SEVERSTAL_ROOT)),
                            severstal.SEVERSTAL_CLASSES)}
    for name, (root, dicts, classes) in loaded.items():
        m = manifests[name]
        verify_manifest(m, dicts, sources=sources[name])
        assert m["seed"] == 3 and m["classes"] == list(classes)
        by_key = {d["image_key"]: d for d in dicts}
        seen = []
        for s in SPLITS:
            api = COCO(str(out / f"{name}_{s}.json"))
            imgs = sorted(api.loadImgs(api.getImgIds()), key=lambda i: i["id"])
            keys = m["splits"][s]["image_keys"]
            assert [i["id"] for i in imgs] == sorted(by_key[k]["image_id"] for k in keys)
            assert {str(root / i["file_name"]) for i in imgs} == {str(Path(by_key[k]["file_name"])) for k in keys}
            assert len(api.getAnnIds()) == m["splits"][s]["boxes"] == sum(len(by_key[k]["annotations"]) for k in keys)
            assert [c["name"] for c in api.loadCats(api.getCatIds())] == list(classes)
            seen += keys
        assert sorted(seen) == sorted(by_key)

    # same seed again (in-process, other folder): byte-identical outputs
    again = tmp_path / "again"
    assert run_main("--neu", neu_root, "--severstal", SEVERSTAL_ROOT, "--out", again, "--seed", 3) == 0
    assert out_files(again) == out_files(out)


def test_seed_and_incremental_runs(neu_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main("--neu", neu_root, "--out", a, "--seed", 0) == 0
    assert set(out_files(a)) == {f"neu_{s}.json" for s in SPLITS} | {"splits.json"}
    assert run_main("--severstal", SEVERSTAL_ROOT, "--out", a, "--seed", 0) == 0  # adds its entry
    assert run_main("--neu", neu_root, "--severstal", SEVERSTAL_ROOT, "--out", b, "--seed", 0) == 0
    assert out_files(a) == out_files(b)
    c = tmp_path / "c"
    assert run_main("--neu", neu_root, "--out", c, "--seed", 1) == 0
    seed0 = json.loads((a / "splits.json").read_text())["neu"]["splits"]["train"]["image_keys"]
    seed1 = json.loads((c / "splits.json").read_text())["neu"]["splits"]["train"]["image_keys"]
    assert len(seed0) == len(seed1) and seed0 != seed1


def test_verify_images_strict_and_non_strict(neu_root, tmp_path, capsys):
    root = tmp_path / "neu"
    shutil.copytree(neu_root, root)
    bad = root / "IMAGES" / "patches_3.jpg"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated JPEG: header parses, decoding fails

    assert run_main("--neu", root, "--out", tmp_path / "plain", "--no-verify-images") == 0  # nothing decodes it
    capsys.readouterr()
    assert run_main("--neu", root, "--out", tmp_path / "strict") == 2  # images are decoded by default
    err = capsys.readouterr().err
    assert "patches_3.jpg" in err and "error:" in err and "ETA" in err
    assert not (tmp_path / "strict").exists()  # a failed run writes nothing

    assert run_main("--neu", root, "--out", tmp_path / "lenient", "--non-strict") == 0
    m = json.loads((tmp_path / "lenient" / "splits.json").read_text())["neu"]
    assert m["skips"] == {"unreadable image": 1}
    kept = [k for s in SPLITS for k in m["splits"][s]["image_keys"]]
    assert len(kept) == 59 and "patches_3" not in kept
    assert "unreadable image: 1" in capsys.readouterr().out


def test_bad_annotation_strict_and_non_strict(neu_root, tmp_path, capsys):
    root = tmp_path / "neu"
    shutil.copytree(neu_root, root)
    (root / "ANNOTATIONS" / "scratches_7.xml").write_text("<annotation>\n<object>\n</annotation>\n")
    assert run_main("--neu", root, "--severstal", SEVERSTAL_ROOT, "--out", tmp_path / "strict") == 2
    assert "scratches_7.xml:" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()
    assert run_main("--neu", root, "--out", tmp_path / "lenient", "--non-strict") == 0
    m = json.loads((tmp_path / "lenient" / "splits.json").read_text())["neu"]
    assert sum(m["skips"].values()) == 1
    assert "scratches_7" not in [k for s in SPLITS for k in m["splits"][s]["image_keys"]]


def test_verify_images_counts_progress(tmp_path, capsys):
    dicts = severstal.load_severstal(str(SEVERSTAL_ROOT))
    skips = SkipLog(strict=True)
    assert verify_images(dicts, skips, "severstal", progress=True) == dicts
    err = capsys.readouterr().err
    assert f"{len(dicts)}/{len(dicts)} images (100%)" in err


def test_needs_a_dataset(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_main("--out", tmp_path)
    assert e.value.code == 2
