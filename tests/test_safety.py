"""Safe loading (no code runs from a weights or prototype file), no silent loss, one-line user errors and
resume past a torn checkpoint."""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from steel_fsd.data import NEU_CLASSES, register_neu, register_severstal
from steel_fsd.data.errors import DatasetError
from steel_fsd.data.severstal import load_severstal
from steel_fsd.synthetic import make_neu_synthetic, make_severstal_synthetic
from steel_fsd.fewshot.adapt import register_support
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.engine.loading import load_model_for_eval
from steel_fsd.engine.trainer import Trainer
from steel_fsd.modeling.checkpoint import SafeCheckpointer, UnsafeWeightsError, WeightsReadError, read_weights_file
from steel_fsd.fewshot.prototypes import PrototypeFileError, PrototypeSet, load_prototypes, save_prototypes
from steel_fsd.modeling.surgery import resize_checkpoint
from steel_fsd.utils.cli import UserError, run_main

REPO = Path(__file__).resolve().parents[1]
FASTER = str(REPO / "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml")
PROTO = str(REPO / "configs/demo/proto_R18_FPN_synth_neu.yaml")
SMALL = ["MODEL.DEVICE", "cpu", "INPUT.HARMONIZE.RESIZE", "96", "INPUT.HARMONIZE.NORMALIZE", "False",
         "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
         "MODEL.PROTOTYPE.EMBED_DIM", "16", "DATASETS.TRAIN", "('t_safe_neu_train',)",
         "DATASETS.TEST", "('t_safe_neu_test',)"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    neu = make_neu_synthetic(root / "neu", n_per_class=4, seed=3)
    for s in ("train", "test"):
        if f"t_safe_neu_{s}" not in DatasetCatalog.list():
            register_neu(f"t_safe_neu_{s}", neu, split=s)
    sev = make_severstal_synthetic(root / "sev", n_images=8, seed=3)
    if "t_safe_sev_test" not in DatasetCatalog.list():
        register_severstal("t_safe_sev_test", sev, split=None, tile=256)
    return root


def config(base: str, out: Path, *opts: str):
    return build_config(base, SMALL + ["OUTPUT_DIR", str(out), *opts])


def saved_model(base: str, path: Path, classes: list[str] | None = list(NEU_CLASSES), *opts: str) -> str:
    """A freshly initialised model of ``base`` saved as a steel-fsd checkpoint at ``path``."""
    from detectron2.modeling import build_model

    model = build_model(config(base, path.parent, *opts))
    SafeCheckpointer(model, str(path.parent), class_names=classes).save(path.stem)
    return str(path)


class Payload:
    """Pickles to a call that writes ``marker`` when unpickled."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        return subprocess.call, (["touch", self.marker],)


def write_payload(path: Path, marker: Path, how: str) -> str:
    payload = {"model": {"backbone.bottom_up.stem.conv1.weight": Payload(marker, how)}, "__author__": "evil"}
    if path.suffix == ".pkl":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    return str(path)


# ----- 1. no code runs from a weights or prototype file ------------------------------------------------------
@pytest.mark.parametrize("how", ["system", "call"])
@pytest.mark.parametrize("ext", [".pkl", ".pth"])
def test_no_loading_path_runs_code_from_a_file(data, tmp_path, how, ext, capsys):
    marker = tmp_path / "PWNED"
    evil = write_payload(tmp_path / f"evil{ext}", marker, how)
    out = tmp_path / "out"
    with pytest.raises(UnsafeWeightsError, match=f"{evil}: refused: it pickles"):
        read_weights_file(evil)
    # train: MODEL.WEIGHTS
    trainer = Trainer(finalize_config(config(FASTER, out, "MODEL.WEIGHTS", evil)))
    with pytest.raises(UnsafeWeightsError, match="refused"):
        trainer.resume_or_load(resume=False)
    # resume: a last_checkpoint naming the payload is refused (not skipped as a torn file)
    (out / "model_0000001.pth").write_bytes(Path(evil).read_bytes())
    (out / "last_checkpoint").write_text("model_0000001.pth")
    with pytest.raises(UnsafeWeightsError, match="refused"):
        trainer.resume_or_load(resume=True)
    # evaluation, register_support
    cfg = finalize_config(config(PROTO, tmp_path / "o2", "MODEL.WEIGHTS", evil))
    with pytest.raises(UnsafeWeightsError, match="refused"):
        load_model_for_eval(cfg)
    with pytest.raises(UnsafeWeightsError, match="refused"):
        register_support(cfg, evil, "t_safe_neu_test", 1, 0, str(tmp_path / "p.pt"), progress=False)
    # checkpoint surgery (function and tool), prototype files (load and as MODEL.PROTOTYPE.SUPPORT_FILE)
    with pytest.raises(UnsafeWeightsError, match="refused"):
        resize_checkpoint(evil, str(tmp_path / "r.pth"), list(NEU_CLASSES), list(NEU_CLASSES))
    surgery = load_tool("ckpt_surgery")
    assert run_main(surgery.main, ["--src", evil, "--dst", str(tmp_path / "r.pth"), "--source-classes", "a",
                                   "--target-classes", "b"]) == 2
    assert "refused" in capsys.readouterr().err
    with pytest.raises(PrototypeFileError, match="refused for safety"):
        load_prototypes(evil)
    weights = saved_model(PROTO, tmp_path / "w" / "model_final.pth")
    cfg = finalize_config(config(PROTO, tmp_path / "o3", "MODEL.WEIGHTS", weights,
                                 "MODEL.PROTOTYPE.SUPPORT_FILE", evil))
    with pytest.raises(PrototypeFileError, match="refused for safety"):
        load_model_for_eval(cfg)
    assert not marker.exists()


@pytest.mark.slow
def test_a_payload_given_to_train_net_is_one_line_and_runs_nothing(data, tmp_path):
    marker = tmp_path / "PWNED"
    evil = write_payload(tmp_path / "evil.pkl", marker, "system")
    env = dict(os.environ, STEEL_FSD_DATASETS=str(tmp_path / "none"))
    res = subprocess.run([sys.executable, str(REPO / "tools" / "register_support.py"), "--config-file", PROTO,
                          "--weights", evil, "--dataset", "t", "--shots", "1", "--out", str(tmp_path / "p.pt")],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, str(REPO / "tools" / "ckpt_surgery.py"), "--src", evil, "--dst",
                          str(tmp_path / "o.pth"), "--source-classes", "a", "--target-classes", "a"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 2 and res.stderr.startswith(f"error: {evil}: refused: it pickles posix.system")
    assert len(res.stderr.strip().splitlines()) == 1 and not marker.exists()


def test_model_zoo_pkl_still_loads(data, tmp_path):
    from detectron2.modeling import build_model

    torch.manual_seed(1)
    src = build_model(config(FASTER, tmp_path))
    state = {k: v.numpy() for k, v in src.state_dict().items()}
    zoo = tmp_path / "model_final_abc.pkl"
    zoo.write_bytes(pickle.dumps({"model": state, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True},
                                 protocol=2))  # what Detectron2's zoo files hold (numpy arrays, protocol 2)
    torch.manual_seed(2)
    dst = build_model(config(FASTER, tmp_path))
    ck = SafeCheckpointer(dst)
    ck.load(str(zoo))
    got = dst.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.state_dict().items() if not k.startswith("pixel_"))
    assert ck.last_classes is None and not ck.last_incompatible.missing_keys
    c2 = tmp_path / "R-18.pkl"  # Caffe2 layout: "blobs", momentum entries dropped
    c2.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.ones((2, 2), np.float32), "conv1_w_momentum": np.ones(1)}}))
    read = read_weights_file(str(c2))
    assert list(read["model"]) == ["conv1_w"] and np.array_equal(read["model"]["conv1_w"], np.ones((2, 2)))
    assert read["__author__"] == "Caffe2" and read["matching_heuristics"] is True


# ----- 2. no silent loss or corruption -------------------------------------------------------------------------
def test_register_support_refuses_zero_shots_and_stock_models(data, tmp_path):
    weights = saved_model(FASTER, tmp_path / "w" / "model_final.pth")
    cfg = finalize_config(config(FASTER, tmp_path / "o"))
    for k in (0, -1):
        with pytest.raises(UserError, match=f"--shots {k}: K must be at least 1"):
            register_support(cfg, weights, "t_safe_neu_train", k, 0, str(tmp_path / "p.pt"), progress=False)
    with pytest.raises(UserError, match="has no prototype head"):
        register_support(cfg, weights, "t_safe_neu_train", 1, 0, str(tmp_path / "p.pt"), progress=False)
    assert not (tmp_path / "p.pt").exists()


def test_prototype_file_with_nan_or_inf_is_refused(tmp_path):
    for bad in (float("nan"), float("inf")):
        protos = torch.ones(3, 4)
        protos[1, 2] = bad
        path = str(tmp_path / "p.pt")
        save_prototypes(PrototypeSet(["a", "b", "c"], protos, 1, 0), path)
        with pytest.raises(PrototypeFileError, match=r"prototypes of \['b'\] hold NaN or inf"):
            load_prototypes(path)


def test_duplicated_severstal_rows_are_counted_not_doubled(severstal_tmp):
    from steel_fsd.data.errors import SkipLog

    rows = [["a.jpg", "1", "1 3"], ["b.jpg", "2", "10 5"]]
    severstal_tmp(rows)
    once = load_severstal(severstal_tmp.root)
    severstal_tmp(rows + [rows[0], rows[0]])  # the same row twice more
    skips = SkipLog(strict=True)
    twice = load_severstal(severstal_tmp.root, skips=skips)
    assert [len(d["annotations"]) for d in twice] == [len(d["annotations"]) for d in once] == [1, 1]
    assert skips.counts == {"duplicate csv row": 2} and "duplicate csv row: 2" in skips.summary()
    path = severstal_tmp(rows + [["a.jpg", "1", "50 3"]])  # same image and class, another mask
    with pytest.raises(DatasetError, match=r"train_v2.csv:4: conflicting csv rows: a.jpg class 1 has another mask at line 2"):
        load_severstal(severstal_tmp.root)
    lenient = SkipLog(strict=False)
    assert [len(d["annotations"]) for d in load_severstal(severstal_tmp.root, skips=lenient)] == [1, 1]
    assert lenient.counts == {"conflicting csv rows": 1} and path.is_file()


def test_class_list_mismatch_and_eval_without_weights_are_errors(data, tmp_path):
    neu = list(NEU_CLASSES)
    weights = saved_model(FASTER, tmp_path / "w" / "model_final.pth")
    ok = finalize_config(config(FASTER, tmp_path / "o", "MODEL.WEIGHTS", weights))
    assert load_model_for_eval(ok) is not None
    # names stored in the checkpoint differ from the dataset's (same count)
    renamed = saved_model(FASTER, tmp_path / "r" / "model_final.pth", neu[::-1])
    cfg = finalize_config(config(FASTER, tmp_path / "o", "MODEL.WEIGHTS", renamed))
    with pytest.raises(UserError, match=r"the model's classes \['scratches', .*\] differ from the 6 classes \['crazing'"):
        load_model_for_eval(cfg)
    # another dataset's class count; and a checkpoint without names falls back to the config's count
    cfg = finalize_config(config(FASTER, tmp_path / "o", "MODEL.WEIGHTS", weights,
                                 "DATASETS.TEST", "('t_safe_sev_test',)"))
    with pytest.raises(UserError, match=r"differ from the 4 classes \['defect_1'"):
        load_model_for_eval(cfg)
    bare = tmp_path / "bare.pth"
    torch.save({"model": read_weights_file(weights)["model"]}, bare)
    cfg = finalize_config(config(FASTER, tmp_path / "o", "MODEL.WEIGHTS", str(bare),
                                 "DATASETS.TEST", "('t_safe_sev_test',)"))
    with pytest.raises(UserError, match=r"model's 6 classes \(config\) differ from the 4 classes"):
        load_model_for_eval(cfg)
    # heads of another size than the config's, and a checkpoint of another architecture
    cfg = finalize_config(config(FASTER, tmp_path / "o", "MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.NUM_CLASSES", "4",
                                 "DATASETS.TEST", "('t_safe_sev_test',)"), datasets=("TEST",))  # as --eval-only
    with pytest.raises(UserError, match=r"layers do not match the config \(roi_heads.box_predictor"):
        load_model_for_eval(cfg)
    cfg = finalize_config(config(PROTO, tmp_path / "o", "MODEL.WEIGHTS", weights))
    with pytest.raises(UserError, match="the checkpoint lacks .* of the model's weights"):
        load_model_for_eval(cfg)
    with pytest.raises(UserError, match=r"no weights to evaluate \(MODEL.WEIGHTS is empty\)"):
        load_model_for_eval(finalize_config(config(FASTER, tmp_path / "empty", "MODEL.WEIGHTS", "")))


@pytest.mark.parametrize("strict", [True, False])
def test_corrupt_truncated_and_empty_images_are_caught_at_first_load(neu_tmp, strict):
    for i in range(4):
        neu_tmp(f"crazing_{i}", [("crazing", 10, 10, 50, 50)])
    good = neu_tmp.root / "IMAGES" / "crazing_0.jpg"
    (neu_tmp.root / "IMAGES" / "crazing_1.jpg").write_bytes(good.read_bytes()[:200])  # truncated
    (neu_tmp.root / "IMAGES" / "crazing_2.jpg").write_bytes(b"")  # zero bytes
    name = f"t_safe_corrupt_{strict}"
    register_neu(name, neu_tmp.root, strict=strict)
    if strict:
        with pytest.raises(DatasetError, match=r"crazing_1.jpg: unreadable image"):
            DatasetCatalog.get(name)
    else:
        dicts = DatasetCatalog.get(name)
        assert sorted(d["image_key"] for d in dicts) == ["crazing_0", "crazing_3"]
        from steel_fsd.data.catalog import _load

        assert _load("neu", str(neu_tmp.root), tuple(NEU_CLASSES), False)[1].counts == {"unreadable image": 2}


# ----- 3. user mistakes get one line ---------------------------------------------------------------------------
def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_tool_mistakes_are_one_line_with_exit_code_2(data, tmp_path, capsys, monkeypatch):
    train_net, register, run_fewshot = load_tool("train_net"), load_tool("register_support"), load_tool("run_fewshot")
    base = ["--config-file", FASTER]
    assert run_main(train_net.cli, base + ["MODEL.NO_SUCH_KEY", "1"]) == 2
    assert "unknown config key MODEL.NO_SUCH_KEY, in the command-line" in one_line(capsys)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"_BASE_: {FASTER}\nMODEL:\n  NO_SUCH: 1\n")
    assert run_main(train_net.cli, ["--config-file", str(bad_yaml)]) == 2
    assert f"unknown config key MODEL.NO_SUCH, in {bad_yaml}" in one_line(capsys)
    assert run_main(train_net.cli, ["--config-file", str(tmp_path / "nope.yaml")]) == 2
    assert f"config file {tmp_path / 'nope.yaml'} not found" in one_line(capsys)
    monkeypatch.setenv("STEEL_FSD_DATASETS", str(tmp_path / "ds"))
    assert run_main(train_net.cli, base + ["DATASETS.TRAIN", "('neu_tain',)"]) == 2
    err = one_line(capsys)
    assert "dataset 'neu_tain' is not registered, DATASETS.TRAIN" in err and str(tmp_path / "ds") in err
    assert "t_safe_neu_train" in err and "coco_2017_train" not in err  # steel datasets only
    (tmp_path / "occupied").write_text("x")
    datasets = ["DATASETS.TRAIN", "('t_safe_neu_train',)", "DATASETS.TEST", "('t_safe_neu_test',)"]
    assert run_main(train_net.cli, base + datasets + ["OUTPUT_DIR", str(tmp_path / "occupied")]) == 2
    assert f"OUTPUT_DIR {tmp_path / 'occupied'} is a file, not a folder" in one_line(capsys)
    assert run_main(train_net.cli, base + datasets + ["OUTPUT_DIR", str(tmp_path / "occupied" / "sub")]) == 2
    assert "is not writable" in one_line(capsys)
    with pytest.raises(UserError):  # --debug shows the traceback instead
        run_main(train_net.cli, base + ["MODEL.NO_SUCH_KEY", "1", "--debug"])
    capsys.readouterr()
    # register_support: --shots 0, a stock checkpoint, an --out that is a folder
    weights = saved_model(FASTER, tmp_path / "w" / "model_final.pth")
    args = ["--config-file", FASTER, "--weights", weights, "--dataset", "t_safe_neu_train", "--out",
            str(tmp_path / "p.pt")] + SMALL + ["OUTPUT_DIR", str(tmp_path / "o")]
    assert run_main(register.main, args[:6] + ["--shots", "0"] + args[6:]) == 2
    assert "--shots 0: K must be at least 1" in one_line(capsys)
    assert run_main(register.main, args[:6] + ["--shots", "1"] + args[6:]) == 2
    assert "has no prototype head" in one_line(capsys)
    args[7] = str(tmp_path)
    assert run_main(register.main, args[:6] + ["--shots", "1"] + args[6:]) == 2
    assert f"--out {tmp_path} is a folder" in one_line(capsys)
    # run_fewshot: unknown --methods, malformed --seeds, a truncated cell file
    proto = str(REPO / "configs/protocols/synth_cpu.yaml")
    monkeypatch.setenv("STEEL_FSD_DATASETS", str(data))
    assert run_main(run_fewshot.main, ["--config", proto, "--methods", "protoype", "--list"]) == 2
    assert "methods ['protoype'] are not in the protocol file" in one_line(capsys)
    assert run_main(run_fewshot.main, ["--config", proto, "--seeds", "0..x", "--list"]) == 2
    assert "--seeds '0..x' is not a seed or a range" in one_line(capsys)
    cell = tmp_path / "fs" / "cells" / "s" / "m" / "K1_seed0.json"
    cell.parent.mkdir(parents=True)
    cell.write_text('{"setting": "s", "kind": "kshot", "metr')
    assert run_main(run_fewshot.main, ["--config", proto, "--out", str(tmp_path / "fs"), "--report-only"]) == 2
    assert f"{cell}: truncated or not a JSON cell file" in one_line(capsys)


def test_empty_split_after_tiling_is_one_line(tmp_path, capsys, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    sev = make_severstal_synthetic(tmp_path / "ds" / "severstal-synth", n_images=1, seed=0, negative_fraction=0.0)
    assert sev.is_dir()
    # names registered earlier in this process (e.g. from ./datasets) are kept by register_all: set them aside
    aside = [(c, n, c.data.pop(n)) for c in (DatasetCatalog, MetadataCatalog) for n in list(c.data)
             if n.startswith(("severstal_synth", "steel_mixed_synth"))]
    try:
        _empty_split_run(tmp_path, capsys, monkeypatch)
    finally:  # the names as they were: this test's registrations (of a temporary folder) go
        for c in (DatasetCatalog, MetadataCatalog):
            for n in [n for n in list(c.data) if n.startswith(("severstal_synth", "steel_mixed_synth"))]:
                del c.data[n]
        for c, n, v in aside:
            c.data[n] = v


def _empty_split_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STEEL_FSD_DATASETS", str(tmp_path / "ds"))
    train_net = load_tool("train_net")
    cfg = str(REPO / "configs/demo/proto_R18_FPN_synth_severstal.yaml")
    rc = run_main(train_net.cli, ["--config-file", cfg, "DATASETS.TRAIN", "('severstal_synth_tiled_test',)",
                                  "DATASETS.TEST", "('severstal_synth_tiled_test',)", "OUTPUT_DIR", str(tmp_path / "o")]
                  + SMALL[:10])
    assert rc == 2
    assert "severstal_synth_tiled_test" in one_line(capsys)


# ----- 4. resume survives a torn checkpoint; writes are atomic ---------------------------------------------------
def _linear(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(m.weight, value)
    return m


def test_resume_falls_back_past_a_torn_last_checkpoint(tmp_path, caplog):
    ck = SafeCheckpointer(_linear(4.0), str(tmp_path))
    ck.save("model_0000004", iteration=4)
    ck.model.weight.data.fill_(9.0)
    ck.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth", "model_0000009.pth"]
    full = (tmp_path / "model_0000009.pth").read_bytes()
    for torn in (full[: len(full) // 2], b""):
        (tmp_path / "model_0000009.pth").write_bytes(torn)
        fresh = SafeCheckpointer(_linear(0.0), str(tmp_path))
        with caplog.at_level(logging.WARNING, logger="steel_fsd"):
            extra = fresh.resume_or_load("", resume=True)
        assert extra["iteration"] == 4 and torch.all(fresh.model.weight == 4.0)
        assert "model_0000009.pth: truncated or corrupt" in caplog.text and "continuing from" in caplog.text
    (tmp_path / "model_0000009.pth").unlink()  # a missing file is skipped too
    assert SafeCheckpointer(_linear(0.0), str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 4
    (tmp_path / "model_0000004.pth").write_bytes(b"\0" * 10)
    with pytest.raises(WeightsReadError, match="no readable checkpoint to resume from"):
        SafeCheckpointer(_linear(0.0), str(tmp_path)).resume_or_load("", resume=True)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    ck = SafeCheckpointer(_linear(1.0), str(tmp_path))
    ck.save("model_final", iteration=1)
    before = (tmp_path / "model_final.pth").read_bytes()

    def dies_halfway(obj, f):
        f.write(b"PK\3\4partial")
        raise KeyboardInterrupt  # e.g. the job is killed while writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    ck.model.weight.data.fill_(2.0)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_final", iteration=2)
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]  # no temp file left


def test_trainer_resumes_past_a_torn_checkpoint_and_saves_class_names(data, tmp_path, caplog):
    opts = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(5,)", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "0"]
    cfg = finalize_config(config(FASTER, tmp_path, *opts))
    trainer = Trainer(cfg)
    assert isinstance(trainer.checkpointer, SafeCheckpointer)
    trainer.resume_or_load(resume=False)
    from detectron2.engine import DefaultTrainer

    DefaultTrainer.train(trainer)  # training only (the final evaluation is not under test here)
    assert read_weights_file(str(tmp_path / "model_final.pth"))["steel_fsd"] == {"thing_classes": list(NEU_CLASSES),
                                                                             "train_tile": 0}
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])
    cfg = finalize_config(config(FASTER, tmp_path, *opts, "SOLVER.MAX_ITER", "3"))
    again = Trainer(cfg)
    with caplog.at_level(logging.WARNING, logger="steel_fsd"):
        again.resume_or_load(resume=True)
    assert again.start_iter == 1 + 1 and "model_final.pth: truncated or corrupt" in caplog.text


def test_prototype_files_with_repeated_or_empty_names_zero_vectors_or_missing_fields_are_refused(tmp_path):
    path = str(tmp_path / "p.pt")
    for names, match in ((["a", "b", "a"], r"\['a'\] repeated"), (["a", "", "c"], "non-empty")):
        save_prototypes(PrototypeSet(names, torch.ones(3, 4), 1, 0), path)
        with pytest.raises(PrototypeFileError, match=match):
            load_prototypes(path)
    protos = torch.ones(3, 4)
    protos[2] = 0
    save_prototypes(PrototypeSet(["a", "b", "c"], protos, 1, 0), path)
    with pytest.raises(PrototypeFileError, match=r"prototypes of \['c'\] are zero vectors"):
        load_prototypes(path)
    save_prototypes(PrototypeSet(["a", "b", "c"], torch.ones(3, 4), 1, 0), path)
    payload = torch.load(path, weights_only=True)
    del payload["class_names"]
    torch.save(payload, path)
    with pytest.raises(PrototypeFileError, match=r"without the fields \['class_names'\]"):
        load_prototypes(path)


def test_shots_above_what_a_class_has_say_how_many_were_used_or_refuse_when_strict(data, tmp_path, caplog):
    weights = saved_model(PROTO, tmp_path / "w" / "model_final.pth")
    cfg = finalize_config(config(PROTO, tmp_path / "o"))
    out = str(tmp_path / "p.pt")
    with pytest.raises(UserError, match=r"--shots 1000: t_safe_neu_train has fewer boxes for \[.*boxes used per class"):
        register_support(cfg, weights, "t_safe_neu_train", 1000, 0, out, progress=False, strict=True)
    assert not os.path.exists(out)
    ps = register_support(cfg, weights, "t_safe_neu_train", 1000, 0, out, progress=False)
    boxes = Counter(DatasetCatalog.get("t_safe_neu_train")[i]["annotations"][j]["category_id"]
                    for i in range(len(DatasetCatalog.get("t_safe_neu_train")))
                    for j in range(len(DatasetCatalog.get("t_safe_neu_train")[i]["annotations"])))
    used = Counter(s["class"] for s in ps.support)
    names = MetadataCatalog.get("t_safe_neu_train").thing_classes
    assert {names[c]: n for c, n in boxes.items()} == dict(used)  # every box of every class, no more
    assert "boxes used per class" in caplog.text
