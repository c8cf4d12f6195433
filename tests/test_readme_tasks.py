"""The README's tasks run as written: its commands are read from README.md and run on a sample COCO dataset and
five support images made here (with a short schedule appended), so a command the README shows cannot rot."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import spot_images, write_coco_json
from steel_fsd.data.neu import load_neu_voc
from steel_fsd.synthetic import make_neu_synthetic

REPO = Path(__file__).resolve().parents[1]
# appended to the README's training command: a plumbing run, not a model
SHORT = ["SOLVER.MAX_ITER", "30", "SOLVER.STEPS", "(25,)", "SOLVER.WARMUP_ITERS", "5", "SOLVER.CHECKPOINT_PERIOD",
         "1000", "INPUT.HARMONIZE.RESIZE", "128", "DATALOADER.NUM_WORKERS", "0"]


def readme_command(section: str) -> list[str]:
    """The first ``bash`` block under the README heading ``## <section>``, as one argument list (continuation
    lines joined); optional ``[...]`` groups are kept without their brackets."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    line = re.sub(r"\\\n\s*", " ", block).strip()
    return shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", line))


def write_sample_coco(root: Path, classes: int = 4) -> None:
    """A COCO dataset of ``classes`` defect classes at the README's paths: data/plates/{images,instances.json}."""
    voc = make_neu_synthetic(root / "voc", n_per_class=8, seed=3)
    dicts = load_neu_voc(voc)
    images = []
    (root / "data" / "plates" / "images").mkdir(parents=True)
    for d in dicts:
        boxes = [(a["category_id"] + 1, *a["bbox"]) for a in d["annotations"] if a["category_id"] < classes]
        if not boxes:
            continue
        shutil.copy(d["file_name"], root / "data" / "plates" / "images")
        images.append((Path(d["file_name"]).name, d["width"], d["height"], boxes))
    names = ["crazing", "inclusion", "patches", "pitted_surface"][:classes]
    write_coco_json(root / "data" / "plates" / "instances.json", images, {n: i + 1 for i, n in enumerate(names)})


@pytest.mark.slow
def test_the_readme_tasks_run_as_written(tmp_path):
    """Train on your own data, a new defect from five images, inspect a folder: each README command, in a fresh
    working folder holding only the sample data, the way a new user would paste it."""
    write_sample_coco(tmp_path)
    support = spot_images(tmp_path / "pinhole" / "images", 5, seed=0)
    (tmp_path / "pinhole" / "boxes.csv").write_text("image,x1,y1,x2,y2,class\n" + "".join(
        f"{name},{x0},{y0},{x1},{y1},pinhole\n" for name, (x0, y0, x1, y1) in support))
    spot_images(tmp_path / "line2", 3, seed=1)
    env = dict(os.environ, STEEL_FSD_DATASETS=str(tmp_path / "none"), PYTHONPATH=str(REPO))

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        assert cmd[0] == "python" and cmd[1].startswith("tools/"), cmd
        # configs and tools are named relative to the repository, data relative to the working folder
        cmd = [sys.executable, str(REPO / cmd[1])] + [str(REPO / a) if a.startswith("configs/") else a
                                                     for a in cmd[2:]]
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, (cmd, res.stderr[-3000:])
        return res

    train = readme_command("Train on your own data")
    assert "--dataset" in train and "MODEL.ROI_HEADS.NUM_CLASSES" in train
    run(train + SHORT)
    weights = tmp_path / "output" / "plates" / "model_final.pth"
    assert weights.is_file()
    assert (tmp_path / "output" / "plates" / "inference" / "plates_val" / "coco_instances_results.json").is_file()

    register = readme_command("A new defect from five images")
    assert register[register.index("--weights") + 1] == "output/plates/model_final.pth"
    run(register)
    from steel_fsd.fewshot.prototypes import load_prototypes
    protos = load_prototypes(str(tmp_path / "pinhole.pt"))
    assert protos.class_names == ["crazing", "inclusion", "patches", "pitted_surface", "pinhole"]
    assert sorted(s["image_key"] for s in protos.support) == sorted(name for name, _ in support)

    predict = readme_command("Inspect a folder of images")
    config = train[train.index("--config-file") + 1]
    predict = [{"CFG": config, "MODEL.pth": str(weights)}.get(a, a) for a in predict]
    threshold = predict.index("--threshold-file")  # made by calibrate_threshold.py, not part of this task
    del predict[threshold:threshold + 2]
    run(predict)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["classes"][-1] == "pinhole" and summary["images"] == 3
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 4  # a header and one row per image
