"""tools/segment_fewshot.py end to end: train a segmenter on a mask-folder dataset given on the command line, segment
query images from support images with masks (mask PNGs in the query's pixels, areas that count them, overlays), and
the bad inputs it refuses or skips."""
import csv
import json

import numpy as np
import pytest
from conftest import REPO, load_tool
from PIL import Image

CFG = str(REPO / "configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml")
SMALL = ["INPUT.HARMONIZE.RESIZE", "64"]


def spots(folder, n, seed, masks=True):
    """Dark spots on a bright plate as JPEG images, with their masks as PNGs beside them (magnetic-tile layout)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.normal(170, 10, (90, 120)).clip(0, 255)
        yy, xx = np.mgrid[:90, :120]
        spot = (yy - rng.integers(25, 65)) ** 2 + (xx - rng.integers(25, 95)) ** 2 <= int(rng.integers(8, 14)) ** 2
        img[spot] = 40
        Image.fromarray(img.astype(np.uint8), "L").save(folder / f"s{seed}_{i}.jpg", quality=95)
        if masks:
            Image.fromarray((spot * 255).astype(np.uint8), "L").save(folder / f"s{seed}_{i}.png")


@pytest.mark.slow
def test_train_then_segment_writes_masks_areas_overlays_and_counts_skips(tmp_path, monkeypatch, capsys):
    from steel_fsd.utils.cli import run_main

    tool = load_tool("segment_fewshot")
    monkeypatch.chdir(tmp_path)
    spots(tmp_path / "data" / "spot", 6, 0)
    weights = str(tmp_path / "seg.pth")
    rc = run_main(tool.main, ["--config-file", CFG,
                              "--weights", weights, "--train-dataset", f"spots=masks:{tmp_path / 'data'}",
                              "--steps", "2", *SMALL])
    assert rc == 0, capsys.readouterr().err
    spots(tmp_path / "support", 2, 1)
    spots(tmp_path / "query", 3, 2, masks=False)
    (tmp_path / "query" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["--config-file", CFG, "--weights", weights, "--support", str(tmp_path / "support"),
            "--query", str(tmp_path / "query"), "--output", str(out)]
    rc = run_main(tool.main, args + SMALL)
    assert rc == 1  # one unreadable query
    with open(out / "areas.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and sum(bool(r["error"]) for r in rows) == 1
    for r in rows:
        if r["error"]:
            continue
        name = f"{int(r['image_id']):06d}_{r['file'].rsplit('/', 1)[1][:-4]}.png"
        mask = np.asarray(Image.open(out / "masks" / name))
        assert mask.shape == (90, 120) and set(np.unique(mask)) <= {0, 255}
        assert int(r["defect_pixels"]) == int((mask == 255).sum())
        assert float(r["defect_fraction"]) == pytest.approx(int(r["defect_pixels"]) / (90 * 120), abs=1e-6)
        assert (out / "overlays" / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["segmented"] == 3 and summary["skipped"] == 1 and len(summary["support"]) == 2
    assert summary["segmenter"]["trained_on"] == ["spot"]
    assert run_main(tool.main, args + ["--allow-skips", "--method", "panet"] + SMALL) == 0


def test_bad_support_and_weights_are_one_line_errors(tmp_path, capsys):
    from steel_fsd.utils.cli import run_main

    tool = load_tool("segment_fewshot")
    spots(tmp_path / "support", 2, 1)
    (tmp_path / "support" / "s1_1.png").unlink()  # an image without its mask
    spots(tmp_path / "query", 1, 2, masks=False)
    (tmp_path / "w.pth").write_text("{}")
    base = ["--config-file", CFG, "--query", str(tmp_path / "query"), "--output", str(tmp_path / "o"), *SMALL]
    assert run_main(tool.main, base[:-2] + ["--weights", str(tmp_path / "w.pth"), "--support",
                                            str(tmp_path / "support"), *SMALL]) == 2
    assert "s1_1.jpg has no mask" in capsys.readouterr().err
    spots(tmp_path / "support", 2, 1)
    assert run_main(tool.main, base[:-2] + ["--weights", str(tmp_path / "w.pth"), "--support",
                                            str(tmp_path / "support"), *SMALL]) == 2
    assert "not a" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--config-file", CFG, "--weights", "w.pth", "--support", str(tmp_path / "support")])
