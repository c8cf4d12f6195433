"""Inputs that ran code, were written through symlinks, crashed on valid data, or gave silent numbers: each is now
read correctly or refused in one line naming the file (and exit code 2 from the tools)."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import load_tool

from steel_fsd.engine.setup import build_config
from steel_fsd.utils.cli import UserError, output_lock
from steel_fsd.utils.io import MAX_NESTING, read_json, read_yaml, save_figure, write_bytes, write_image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "faster_rcnn_R18_FPN_synth_neu.yaml"


def run_tool_main(name: str, argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``tools/<name>.py argv`` run in this process, as its command line runs it (argparse
    errors exit 2; user errors are one line and 2 through ``run_main``)."""
    import contextlib
    import io

    from steel_fsd.utils.cli import run_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = run_main(load_tool(name).main, argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def _evil(tmp_path, marker):
    return f'SEED: !!python/object/apply:os.system ["touch {marker}"]\n'


def test_a_python_tag_in_a_config_or_its_base_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    base = tmp_path / "base.yaml"
    base.write_text(f'_BASE_: "{DEMO}"\n\n' + _evil(tmp_path, marker))
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "base.yaml"\nSOLVER:\n  MAX_ITER: 3\n')
    for cfg_file, line in ((base, 3), (child, 3)):
        with pytest.raises(UserError, match=rf"YAML tag refused .*at {base}:{line}"):
            build_config(str(cfg_file))
    assert not marker.exists()
    # through the tool: one line, exit 2, nothing run
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(child),
                        "--eval-only"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "YAML tag refused" in r.stderr
    assert not marker.exists()


def test_protocol_and_other_yaml_and_json_files_are_plain_data_with_bounded_nesting(tmp_path):
    from steel_fsd.fewshot.protocol.spec import load_protocol_file

    marker = tmp_path / "PWNED"
    proto = tmp_path / "p.yaml"
    proto.write_text("OUTPUT_DIR: x\n" + _evil(tmp_path, marker))
    with pytest.raises(UserError, match=rf"protocol file YAML tag refused .*at {proto}:2"):
        load_protocol_file(proto)
    assert not marker.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match=rf"is not valid YAML .*{bad}:2"):
        read_yaml(bad)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(UserError, match="nested more than"):
        read_json(deep)
    deep.write_text(json.dumps(json.loads("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1))))
    with pytest.raises(UserError, match="nested more than"):
        read_json(deep)
    ok = [[0]]
    for _ in range(MAX_NESTING - 2):
        ok = [ok]
    deep.write_text(json.dumps(ok))
    assert read_json(deep) == ok  # exactly MAX_NESTING deep is fine
    torn = tmp_path / "torn.json"
    torn.write_text('{"a": 1,\n "b": ')
    with pytest.raises(UserError, match=r"torn.json is not valid JSON .*torn.json:2"):
        read_json(torn, "threshold file")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-0.1", "1.5", "true", '"0.5"', "null"])
def test_threshold_files_outside_0_1_or_not_numbers_are_refused(tmp_path, value):
    sys.path.insert(0, str(REPO / "tools"))
    import predict

    f = tmp_path / "t.json"
    f.write_text('{"score_threshold": %s}' % value)
    with pytest.raises(UserError, match="threshold"):
        predict.load_threshold(str(f), 0.5)
    f.write_text('{"score_threshold": 0.25}')
    assert predict.load_threshold(str(f), 0.5) == (0.25, str(f))
    with pytest.raises(UserError, match=r"not a number in \[0, 1\]"):
        predict.load_threshold(None, float("nan"))


def test_outputs_replace_a_symlink_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    for name, write in (("a.bin", lambda p: write_bytes(p, b"new")),
                        ("a.png", lambda p: write_image(p, np.zeros((4, 4, 3), np.uint8))),
                        ("fig.png", lambda p: save_figure(__import__("matplotlib.figure").figure.Figure(), p))):
        link = out / name
        link.symlink_to(outside)
        write(str(link))
        assert not link.is_symlink() and link.stat().st_size > 0
        assert outside.read_text() == "keep me"


def test_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "model.ts"
    target.write_bytes(b"old model")

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:3])
            raise OSError(28, "No space left on device")

    import steel_fsd.utils.io as io_mod

    real = io_mod.atomic_open

    from contextlib import contextmanager

    @contextmanager
    def full_open(path, mode="w"):
        with real(path, mode) as f:
            yield Full(f)

    monkeypatch.setattr(io_mod, "atomic_open", full_open)
    with pytest.raises(OSError, match="No space"):
        write_bytes(target, b"new model bytes")
    assert target.read_bytes() == b"old model" and [p.name for p in tmp_path.iterdir()] == ["model.ts"]


def test_a_second_live_run_into_one_output_folder_is_refused_naming_the_first(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from steel_fsd.utils.cli import output_lock
        with output_lock({str(folder)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"OUTPUT_DIR {folder} is in use by another run \(pid {holder.pid} "):
            with output_lock(str(folder)):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(str(folder)):  # the kernel released the dead run's lock
        with output_lock(str(folder)):  # nested in one process: fine
            pass


@pytest.mark.parametrize("key, value, match", [
    ("MODEL.PROTOTYPE.EMBED_DIM", "0", "MODEL.PROTOTYPE.EMBED_DIM is 0"),
    ("SOLVER.IMS_PER_BATCH", "0", "SOLVER.IMS_PER_BATCH is 0"),
    ("SOLVER.CHECKPOINT_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD is 0"),
    ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.5", "SCORE_THRESH_TEST is 1.5"),
    ("MODEL.DEVICE", "tpu", "MODEL.DEVICE is 'tpu'"),
    ("SOLVER.BASE_LR", "-0.1", "SOLVER.BASE_LR is -0.1"),
    ("MODEL.ROI_HEADS.NUM_CLASSES", "3", "NUM_CLASSES is 3 but t_rel_train has 6 classes"),
    ("INPUT.AUG.GAMMA_RANGE", "[2.0]", r"GAMMA_RANGE is \[2.0\].*low <= high"),
    ("MODEL.PROTOTYPE.TAU_RANGE", "[64.0, 1.0]", r"TAU_RANGE is \[64.0, 1.0\]"),
    ("SOLVER.STEPS", "(5, 2)", r"SOLVER.STEPS is \(5, 2\).*increasing"),
    ("MODEL_EMA.DECAY", "1.5", "MODEL_EMA.DECAY is 1.5"),
])
def test_config_values_that_would_crash_deep_inside_are_refused_by_key(tmp_path, key, value, match):
    from detectron2.data import DatasetCatalog

    from steel_fsd.data import register_neu
    from steel_fsd.engine.setup import finalize_config
    from steel_fsd.synthetic import make_neu_synthetic

    if "t_rel_train" not in DatasetCatalog.list():
        register_neu("t_rel_train", make_neu_synthetic(tmp_path / "neu", n_per_class=1, seed=0), split="train")
    cfg = build_config(str(REPO / "configs" / "demo" / "proto_R18_FPN_synth_neu.yaml"),
                       ["DATASETS.TRAIN", "('t_rel_train',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "o"),
                        "INPUT.HARMONIZE.NORMALIZE", "False", key, value])
    with pytest.raises(UserError, match=match):
        finalize_config(cfg)


@pytest.mark.parametrize("text, match", [("", "holds nothing"), ("- 1\n", "holds list"),
                                         ("_BASE_: list.yaml\n", "not a mapping of KEY: value")])
def test_config_files_that_are_not_mappings_are_one_line_errors(tmp_path, text, match):
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError, match=match):
        build_config(str(tmp_path / "c.yaml"))


@pytest.mark.parametrize("args, match", [(["--tile", "-5"], "--tile -5"), (["--tile", "8"], "at least 32"),
                                         (["--overlay-score", "2"], r"scores are in \[0, 1\]")])
def test_predict_options_out_of_range_are_refused(tmp_path, capsys, args, match):
    rc, err = run_tool_main("predict", ["--config-file", "c.yaml", "--weights", "w.pth", "--input", "x",
                                        "--output", str(tmp_path / "o"), *args])
    assert rc == 2 and re.search(match, err), err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_a_weights_file_that_is_no_weights_file_says_so(tmp_path):
    from steel_fsd.modeling.checkpoint import WeightsReadError, read_weights_file

    (tmp_path / "w.pth").write_text('{"not": "weights"}')
    with pytest.raises(WeightsReadError, match="not a weights file .expected a .pth written by torch.save"):
        read_weights_file(str(tmp_path / "w.pth"))


def test_pixel_statistics_and_dataset_digest_follow_the_annotations(tmp_path):
    """Editing an annotation changes the dataset digest, so the cached pixel statistics (and the protocol's
    models, keyed the same way) are rebuilt instead of reused."""
    from detectron2.data import DatasetCatalog

    from steel_fsd.data import register_neu
    from steel_fsd.data.catalog import dataset_digest, forget_loaded
    from steel_fsd.engine.setup import finalize_config
    from steel_fsd.synthetic import make_neu_synthetic

    root = make_neu_synthetic(tmp_path / "neu", n_per_class=1, seed=0)
    register_neu("t_rel_digest_a", root, split="train")
    before = dataset_digest("t_rel_digest_a")
    assert dataset_digest("t_rel_digest_a") == before  # deterministic
    cfg_args = ["DATASETS.TRAIN", "('t_rel_digest_a',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "o"),
                "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "4"]
    finalize_config(build_config(str(REPO / "configs" / "demo" / "proto_R18_FPN_synth_neu.yaml"), cfg_args))
    key1 = json.loads((tmp_path / "o" / "pixel_stats.json").read_text())["key"]
    stem = Path(DatasetCatalog.get("t_rel_digest_a")[0]["file_name"]).stem  # an image of this split
    xml = next((root / "ANNOTATIONS").glob(f"{stem}.xml"))
    text = xml.read_text()
    xmin = int(text.split("<xmin>")[1].split("<")[0])
    xml.write_text(text.replace(text[text.index("<xmax>"):text.index("</xmax>")], f"<xmax>{xmin + 3}", 1))
    forget_loaded()
    register_neu("t_rel_digest_b", root, split="train")  # the same files read again
    assert dataset_digest("t_rel_digest_b") != before
    cfg_args[1] = "('t_rel_digest_b',)"
    finalize_config(build_config(str(REPO / "configs" / "demo" / "proto_R18_FPN_synth_neu.yaml"), cfg_args))
    key2 = json.loads((tmp_path / "o" / "pixel_stats.json").read_text())["key"]
    assert key1["content"] != key2["content"]
    DatasetCatalog.remove("t_rel_digest_a")
    DatasetCatalog.remove("t_rel_digest_b")


@pytest.mark.parametrize("tool, args, match", [
    ("pretrain_backbone.py", ["--config-file", "c.yaml", "--images", "x", "--out", "o.pth", "--epochs", "0"],
     "need at least 1 epoch"),
    ("pretrain_backbone.py", ["--config-file", "c.yaml", "--images", "x", "--out", "o.pth", "--batch", "1"],
     "a batch of at least 2"),
    ("make_synthetic.py", ["--out", "o", "--neu-per-class", "0"], "must be at least 1"),
    ("embedding_report.py", ["--config-file", "c.yaml", "--weights", "w.pth", "--dataset", "d", "--out", "o",
                             "--shots", "0"], "--shots 0 and --max-per-class 50 must be at least 1"),
])
def test_counts_below_one_are_refused_before_any_work(tmp_path, monkeypatch, tool, args, match):
    monkeypatch.chdir(tmp_path)
    rc, err = run_tool_main(tool.removesuffix(".py"), args)
    assert rc == 2 and match in err, err
    assert not list(tmp_path.iterdir())  # nothing written
