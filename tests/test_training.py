"""End to end through tools/train_net.py: train, checkpoint, resume, evaluate (tiny, on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steel_fsd.synthetic import make_neu_synthetic

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "configs" / "demo" / "faster_rcnn_R18_FPN_synth_neu.yaml"
TINY = ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "INPUT.HARMONIZE.RESIZE", "128",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
        "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "8"]


def train_net(root: Path, out: Path, *args: str) -> str:
    env = dict(os.environ, STEEL_FSD_DATASETS=str(root))
    res = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(CFG), *args,
                          "OUTPUT_DIR", str(out), *TINY], capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def iterations(out: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()
            if "total_loss" in line]


@pytest.mark.slow
def test_train_checkpoint_resume_evaluate(tmp_path):
    make_neu_synthetic(tmp_path / "data" / "neu-synth", n_per_class=7, seed=0)
    out = tmp_path / "run"
    log = train_net(tmp_path / "data", out, "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)")
    assert (out / "model_final.pth").is_file() and (out / "model_0000001.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert json.loads((out / "pixel_stats.json").read_text())["key"]["datasets"] == ["neu_synth_train"]
    assert "neu_synth_train: " in log and "boxes per class" in log  # registration summary
    assert iterations(out)[-1] == 3

    log = train_net(tmp_path / "data", out, "--resume", "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "(3,)")
    assert "Starting training from iteration 4" in log
    assert iterations(out) == [3, 5]  # the resumed run continued at 4 instead of restarting at 0

    # evaluation applies the weights with the pixel statistics saved beside them (here: a copy marked by hand)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "model_final.pth").write_bytes((out / "model_final.pth").read_bytes())
    stats = json.loads((out / "pixel_stats.json").read_text())
    (moved / "pixel_stats.json").write_text(json.dumps(dict(stats, mean=[77.0] * 3)))
    log = train_net(tmp_path / "data", out, "--eval-only", "MODEL.WEIGHTS", str(moved / "model_final.pth"))
    assert json.loads((out / "pixel_stats.json").read_text())["mean"] == [77.0] * 3
    result = json.loads((out / "inference" / "neu_synth_test" / "prf_results.json").read_text())
    assert {"precision", "recall", "f1"} <= set(result)
    assert (out / "inference" / "neu_synth_test" / "coco_instances_results.json").is_file()
    assert "copypaste: AP,AP50,AP75" in log


def test_unreadable_weights_fail_with_a_way_forward(tmp_path):
    make_neu_synthetic(tmp_path / "data" / "neu-synth", n_per_class=5, seed=0)
    env = dict(os.environ, STEEL_FSD_DATASETS=str(tmp_path / "data"))
    res = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(CFG),
                          "MODEL.WEIGHTS", str(tmp_path / "missing.pkl"), "OUTPUT_DIR", str(tmp_path / "o"), *TINY],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "missing.pkl' cannot be read" in res.stderr and 'MODEL.WEIGHTS ""' in res.stderr


@pytest.mark.slow
def test_same_seed_same_training_in_process(tmp_path):
    """A Trainer built in-process (as make demo, the protocol and the benchmarks do) is seeded by SEED:
    two runs give the same losses, another seed different ones."""
    from detectron2.utils.logger import setup_logger  # noqa: F401

    from steel_fsd.data import register_neu
    from steel_fsd.engine.setup import build_config, finalize_config
    from steel_fsd.engine.trainer import Trainer

    make_neu_synthetic(tmp_path / "neu", n_per_class=4, seed=0)
    register_neu("t_seed_train", tmp_path / "neu", split="train")

    def losses(seed: int, out: str) -> list[float]:
        cfg = build_config(str(CFG), TINY + ["DATASETS.TRAIN", "('t_seed_train',)", "DATASETS.TEST", "()",
                                             "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "()", "SEED", str(seed),
                                             "OUTPUT_DIR", str(tmp_path / out)])
        finalize_config(cfg)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        return [json.loads(line)["total_loss"] for line in (tmp_path / out / "metrics.json").read_text().splitlines()
                if "total_loss" in line]

    a, b, c = losses(5, "a"), losses(5, "b"), losses(6, "c")
    assert a == b and a != c


def test_trained_pixel_stats_win_even_in_the_output_folder(tmp_path):
    """Weights evaluated in their own run folder under a config naming other training data: the run's
    pixel_stats.json is used and kept, not recomputed over (the datasets named here are not even registered)."""
    from steel_fsd.engine.setup import build_config, resolve_pixel_stats

    saved = {"key": {"datasets": ["base:somewhere"], "clahe": [True, 2.0, 8], "max_images": 8},
             "mean": [11.0] * 3, "std": [22.0] * 3}
    (tmp_path / "pixel_stats.json").write_text(json.dumps(saved))
    cfg = build_config(str(CFG), ["OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", "('not_registered',)"])
    resolve_pixel_stats(cfg, str(tmp_path / "model_final.pth"))
    assert list(cfg.MODEL.PIXEL_MEAN) == [11.0] * 3 and list(cfg.MODEL.PIXEL_STD) == [22.0] * 3
    assert json.loads((tmp_path / "pixel_stats.json").read_text()) == saved
