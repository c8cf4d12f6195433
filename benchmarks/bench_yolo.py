"""Optional "what users would pick instead" row: an Ultralytics YOLO model trained from its YAML (no
downloaded weights) on the same data, scored with the project's own evaluators (COCO AP + P/R/F1).

    pip install --no-deps -r benchmarks/requirements-yolo.txt      # optional; never a package dependency
    python benchmarks/bench_yolo.py --in-domain --epochs 3
    python tools/prepare_fewshot.py --dataset neu_synth_train --shots 1 5 10 --seeds 0 1 2 \
        --eval-dataset neu_synth_test --out output/fewshot_synth/manifests
    python benchmarks/bench_yolo.py --kshot-manifests output/fewshot_synth/manifests --shots 1 5 10 --seeds 0 1 2

``--in-domain`` trains on the train split and evaluates on the test split. ``--kshot-manifests DIR`` trains
one model per ``<train>_<K>shot_seed<S>.json`` manifest on the manifest's support images only (each with
only its manifest boxes, as the Detectron2 K-shot rows) and writes a protocol cell
``OUT/cells/kshot_<key>/yolo/K<K>_seed<S>.json`` that tools/run_fewshot.py's report aggregates. With
``--cross-source TRAIN --cross-source-val VAL`` it is the cross-dataset peer instead: one model trained on the
source split (once, reused; ``--source-time-minutes`` for a wall budget equal to a Detectron2 source model's),
then fine-tuned from it on each manifest's support images (its class layers resized to the target's classes),
cells ``OUT/cells/cross_<source key>-<key>/yolo_ft/``. Existing cells are kept (``--overwrite`` redoes them).

Images are exported as PNG files from ``read_dataset_image`` (tiles become real images; see
benchmarks/yolo_export.py). Predictions (conf >= ``--conf``, at most ``--max-det`` per image, in original
image coordinates) go through ``steel_fsd.engine.trainer.build_evaluator``, so the numbers compare with
the Detectron2 rows. Offline by construction: the model comes from a packaged YAML, AMP and plots are off
(no AMP-check model, no font download), settings live in a private ``YOLO_CONFIG_DIR``, ``YOLO_OFFLINE=1``
stops the online checks, and (unless ``--allow-network``) every socket connection or DNS lookup raises
and is recorded in the results as ``network_attempts``. Summary: benchmarks/results/yolo.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

REQUIREMENTS = "benchmarks/requirements-yolo.txt"
INSTALL = f"pip install --no-deps -r {REQUIREMENTS}"
METRICS = ("AP", "AP50", "AP75", "P", "R", "F1")
NETWORK_ATTEMPTS: list[str] = []


def block_network() -> None:
    """Make every DNS lookup and internet socket connection raise OSError, recording what was tried."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(what: str, target) -> OSError:
        NETWORK_ATTEMPTS.append(f"{what} {target}")
        return OSError(f"network blocked by bench_yolo.py ({what} {target}); pass --allow-network to permit")

    def getaddrinfo(host, *args, **kwargs):
        raise refuse("getaddrinfo", host)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise refuse("connect", address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise refuse("connect", address)
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex


def prepare_ultralytics(config_dir: Path, threads: int, verbose: bool = False):
    """Import Ultralytics with its settings in ``config_dir``, offline, at most ``threads`` CPU threads."""
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir.resolve())
    os.environ["YOLO_OFFLINE"] = "1"      # is_online() -> False: no version checks, no analytics
    os.environ["YOLO_VERBOSE"] = str(bool(verbose))  # training progress, per epoch
    import ultralytics
    import ultralytics.data.utils as ud
    import ultralytics.utils.torch_utils as tu
    from ultralytics import settings

    # no analytics or crash reports even if the environment looked online, no logger integrations, runs here
    settings.update({"sync": False, "runs_dir": str((config_dir.parent / "runs").resolve()),
                     **{k: False for k in ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
                        if k in settings}})
    tu.NUM_THREADS = threads          # select_device() sets torch threads to this on CPU
    if hasattr(ud, "check_font"):     # check_det_dataset() fetches Arial.ttf for plots; plots are off
        ud.check_font = lambda *a, **k: None
    return ultralytics


# ----- data ---------------------------------------------------------------------------------------
def export(dicts: list[dict], names: list[str], root: Path, split: str) -> dict:
    from yolo_export import export_split

    from steel_fsd.data.images import read_dataset_image
    return export_split(dicts, names, root, split, read_dataset_image)


def train_yolo(args, data_yaml: Path, run_dir: Path, seed: int) -> tuple[Path, float, int, int]:
    """Train from ``args.model`` (a YAML) -> (last weights, wall seconds, optimizer steps, epochs)."""
    from ultralytics import YOLO

    model = YOLO(args.model)
    steps = [0]

    def count_steps(trainer):  # wrap the optimizer step once training has built it
        inner = trainer.optimizer_step

        def step(*a, **k):
            steps[0] += 1
            return inner(*a, **k)
        trainer.optimizer_step = step
    model.add_callback("on_pretrain_routine_end", count_steps)
    run_dir = run_dir.resolve()  # a relative project would land under Ultralytics' runs_dir
    start = time.perf_counter()
    budget = {"time": args.time_minutes / 60} if getattr(args, "time_minutes", None) else {}  # overrides epochs
    model.train(data=str(data_yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, **budget,
                nbs=args.nbs or args.batch, device="cpu", workers=0, pretrained=False, amp=False, plots=False,
                val=False, seed=seed, deterministic=True, project=str(run_dir.parent), name=run_dir.name,
                exist_ok=True, verbose=False)
    wall = time.perf_counter() - start
    weights = Path(model.trainer.last)
    return weights, wall, steps[0], int(model.trainer.epoch) + 1


def predict_and_evaluate(args, weights: Path, test: str, index: dict, out_dir: Path) -> tuple[dict, float]:
    """Predict the exported test images, score them with the project's evaluators -> (results, seconds)."""
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances
    from ultralytics import YOLO

    from common import REPO
    from steel_fsd.engine.setup import build_config
    from steel_fsd.engine.trainer import build_evaluator

    cfg = build_config(str(REPO / "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml"), ["OUTPUT_DIR", str(out_dir)])
    by_id = {d["image_id"]: d for d in DatasetCatalog.get(test)}
    evaluator = build_evaluator(cfg, test, str(out_dir / "inference" / test))
    evaluator.reset()
    model = YOLO(str(weights))
    paths = sorted(index)
    start = time.perf_counter()
    for i in range(0, len(paths), 16):
        chunk = paths[i:i + 16]
        preds = model.predict(chunk, imgsz=args.imgsz, conf=args.conf, max_det=args.max_det, device="cpu",
                              verbose=False)
        inputs, outputs = [], []
        for path, r in zip(chunk, preds):
            d = by_id[index[path]["image_id"]]
            h, w = int(d["height"]), int(d["width"])
            if tuple(r.orig_shape) != (h, w):
                raise ValueError(f"{path}: predicted on {r.orig_shape}, dataset dict says {(h, w)}")
            b = r.boxes
            inst = Instances((h, w), pred_boxes=Boxes(b.xyxy.detach().cpu().float()),
                             scores=b.conf.detach().cpu().float(), pred_classes=b.cls.detach().cpu().long())
            inputs.append(d)
            outputs.append({"instances": inst})
        evaluator.process(inputs, outputs)
    seconds = time.perf_counter() - start
    return evaluator.evaluate(), seconds


def rows_of(results: dict, classes: list[str]) -> tuple[dict, dict, bool]:
    """(mean metrics, per-class metrics, no_predictions) in percent, as the protocol's cells hold them."""
    from steel_fsd.fewshot.protocol import cell_record
    rec = cell_record(results, classes, [], [])
    return rec["metrics"], rec["per_class"], rec["no_predictions"]


def _round(m: dict) -> dict:
    return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 2))
            for k, v in m.items()}


# ----- modes --------------------------------------------------------------------------------------
def in_domain(args) -> dict:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from steel_fsd.evaluation.prf import f1_at_chosen_threshold
    from yolo_export import write_data_yaml

    names = list(MetadataCatalog.get(args.train).thing_classes)
    work = Path(args.work) / "in_domain"
    data_root = Path(args.work) / "data" / args.train
    t0 = time.perf_counter()
    export(DatasetCatalog.get(args.train), names, data_root, "train")
    val_index = export(DatasetCatalog.get(args.val), names, data_root, "val")
    index = export(DatasetCatalog.get(args.test), names, data_root, "test")
    export_s = time.perf_counter() - t0
    data_yaml = write_data_yaml(data_root, names, "train", "val", file_name="data.yaml")
    weights, train_s, steps, epochs = train_yolo(args, data_yaml, work / f"run_{args.train}", args.seed)
    results, predict_s = predict_and_evaluate(args, weights, args.test, index, work)
    mean, per_class, empty = rows_of(results, names)
    # F1 at the score threshold best on the validation split (as for the Detectron2 rows of bench_recipe.py)
    val_results, _ = predict_and_evaluate(args, weights, args.val, val_index, work)
    threshold, mean["F1_valthr"] = f1_at_chosen_threshold(val_results["prf"], results["prf"])
    return {"train": args.train, "val": args.val, "test": args.test, "seed": args.seed, "epochs": epochs,
            "val_threshold": threshold, "val_mean": _round(rows_of(val_results, names)[0]),
            "optimizer_steps": steps, "train_images": len(DatasetCatalog.get(args.train)), "export_s": round(export_s, 1),
            "train_s": round(train_s, 1), "predict_s": round(predict_s, 1), "weights": str(weights),
            "mean": _round(mean), "per_class": {c: _round(v) for c, v in per_class.items()}, "no_predictions": empty}


def source_model(args) -> tuple[Path, dict]:
    """The YOLO model trained on the cross-dataset source (``--cross-source``), trained once and reused: its
    ``source_info.json`` records the settings, and a run with other settings trains again into another folder."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from yolo_export import write_data_yaml

    budget = {"model": args.model, "imgsz": args.imgsz, "batch": args.batch, "nbs": args.nbs or args.batch,
              "epochs": args.source_epochs, "time_minutes": args.source_time_minutes, "seed": 0}
    tag = "_".join(f"{v}" for v in budget.values() if v is not None).replace(".", "p")
    run_dir = Path(args.out) / "yolo" / "runs" / f"source_{args.cross_source}_{tag}"
    info_path = run_dir / "source_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if Path(info["weights"]).is_file():
            print(f"[bench_yolo] source model {info['weights']} reused ({info['train_s']:.0f} s of training)")
            return Path(info["weights"]), info
    from steel_fsd.data.catalog import require_registered

    for name, flag in ((args.cross_source, "--cross-source"), (args.cross_source_val, "--cross-source-val")):
        require_registered(name, flag, nonempty=True)
    names = list(MetadataCatalog.get(args.cross_source).thing_classes)
    data_root = Path(args.out) / "yolo" / "data" / args.cross_source
    export(DatasetCatalog.get(args.cross_source), names, data_root, "train")
    export(DatasetCatalog.get(args.cross_source_val), names, data_root, "val")
    data_yaml = write_data_yaml(data_root, names, "train", "val", file_name="data.yaml")
    a = argparse.Namespace(**vars(args))
    a.epochs, a.time_minutes = args.source_epochs or 30, args.source_time_minutes
    weights, train_s, steps, epochs = train_yolo(a, data_yaml, run_dir, 0)
    info = {"train": args.cross_source, "classes": names, "weights": str(weights), "train_s": round(train_s, 1),
            "optimizer_steps": steps, "epochs": epochs, "train_images": len(DatasetCatalog.get(args.cross_source)),
            "settings": budget}
    info_path.write_text(json.dumps(info, indent=1))
    return weights, info


def manifest_cells(args, init: Path | None = None, source: dict | None = None) -> dict:
    """One YOLO model per ``<train>_<K>shot_seed<S>.json`` manifest, trained on the manifest's support images only,
    evaluated on ``--test``, written as protocol cells. ``init`` None: trained from ``--model`` (the YAML; the
    K-shot lower bound, setting ``kshot_<key>``, method ``yolo``); else fine-tuned from the source model ``init``
    (its class layers resized to the target classes; setting ``cross_<source key>-<key>``, method ``yolo_ft``)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from steel_fsd.fewshot.support import assert_disjoint, load_manifest, manifest_support_dicts
    from steel_fsd.fewshot.protocol import Cell
    from yolo_export import write_data_yaml

    names = list(MetadataCatalog.get(args.train).thing_classes)
    out = Path(args.out)
    kind = "kshot" if init is None else "cross"
    setting, method = (f"kshot_{args.key}", "yolo") if init is None else (f"cross_{args.source_key}-{args.key}", "yolo_ft")
    data_root = out / "yolo" / "data" / args.train
    train_dicts, test_dicts = DatasetCatalog.get(args.train), DatasetCatalog.get(args.test)
    index = export(test_dicts, names, data_root, "test")
    export(DatasetCatalog.get(args.val), names, data_root, "val")
    cells = {}
    for k in args.shots:
        for s in args.seeds:
            mpath = Path(args.kshot_manifests) / f"{args.train}_{k}shot_seed{s}.json"
            path = out / "cells" / setting / method / f"K{k}_seed{s}.json"
            if path.is_file() and not args.overwrite:
                print(f"[bench_yolo] {path} exists, kept (--overwrite to redo)")
                cells[(k, s)] = json.loads(path.read_text())
                continue
            m = load_manifest(mpath)
            if m["dataset"] != args.train or m["shots"] != k or m["seed"] != s:
                raise ValueError(f"{mpath}: manifest is {m['dataset']} K={m['shots']} seed={m['seed']}, "
                                 f"expected {args.train} K={k} seed={s}")
            assert_disjoint(m, test_dicts)
            support = manifest_support_dicts(m, train_dicts)
            split = f"K{k}_seed{s}"
            export(support, names, data_root, split)
            data_yaml = write_data_yaml(data_root, names, split, "val", file_name=f"data_{split}.yaml")
            a = argparse.Namespace(**vars(args))
            if init is not None:
                a.model = str(init)
            weights, train_s, steps, epochs = train_yolo(a, data_yaml, out / "yolo" / "runs" / f"{setting}_{split}", s)
            work = path.with_suffix("")
            results, predict_s = predict_and_evaluate(args, weights, args.test, index, work)
            extra = {"support_images": len(support), "epochs": epochs, "model": args.model, "imgsz": args.imgsz,
                     "predict_s": round(predict_s, 2)}
            if source is not None:
                extra["source_model"] = {k_: source[k_] for k_ in ("train", "train_s", "epochs", "optimizer_steps")}
            cell = Cell.from_results(path, results, args.test, setting=setting, kind=kind,
                                     source=args.key if init is None else args.source_key, target=args.key,
                                     method=method, shots=k, seed=s, classes=names, base=[], novel=names,
                                     adapt_s=train_s, adapt_iters=steps, manifest=mpath, extra=extra).write(path)
            print(f"[bench_yolo] {setting} {method} K={k} seed={s}: AP {cell['metrics']['AP']:.1f} AP50 "
                  f"{cell['metrics']['AP50']:.1f} F1 {cell['metrics']['F1']:.1f} ({train_s:.1f} s training, "
                  f"{steps} steps, {len(support)} images) -> {path}")
            cells[(k, s)] = cell
    from steel_fsd.evaluation.aggregate import aggregate

    rows = {}
    for row in aggregate(list(cells.values())):  # the protocol's own mean +- CI over seeds
        got = [c for (k, _), c in sorted(cells.items()) if k == row["shots"]]
        rows[str(row["shots"])] = {
            "seeds": row["seeds"], "epochs": sorted({c.get("epochs") for c in got}),
            "mean": _round({m: row[m]["mean"] for m in METRICS}), "ci95": _round({m: row[m]["ci95"] for m in METRICS}),
            "adapt_s": round(row["adapt_s"]["mean"], 1), "adapt_iters": round(row["adapt_iters"]["mean"], 1),
            "per_seed": {str(c["seed"]): _round(c["metrics"]) for c in got}}
    return {"setting": setting, "train": args.train, "test": args.test, "manifests": str(args.kshot_manifests),
            "cells": str(out / "cells" / setting / method), "shots": rows}


def markdown(result: dict) -> str:
    from tabulate import tabulate

    rows = []
    if "in_domain" in result:
        r = result["in_domain"]
        rows.append([f"YOLO in-domain ({r['train']} -> {r['test']}, {r['epochs']} ep)"]
                    + [r["mean"][m] for m in METRICS] + [round(r["train_s"]), r["optimizer_steps"]])
    for mode, label in (("kshot", "YOLO K={k}"), ("cross", "YOLO source fine-tuned, K={k}")):
        for k, r in result.get(mode, {}).get("shots", {}).items():
            rows.append([f"{label.format(k=k)} (seeds {r['seeds']}, {'/'.join(map(str, r.get('epochs', [])))} ep)"]
                        + [r["mean"][m] for m in METRICS] + [round(r["adapt_s"]), f"{r['adapt_iters']:g}"])
    return tabulate(rows, headers=["row", *METRICS, "train s", "steps"], floatfmt=".1f", missingval="n/a",
                    tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-domain", action="store_true", help="train on --train, evaluate on --test")
    ap.add_argument("--kshot-manifests", metavar="DIR", help="folder of <train>_<K>shot_seed<S>.json manifests")
    ap.add_argument("--cross-source", metavar="TRAIN", help="with --kshot-manifests: train a model on this source "
                    "split first (once, reused), then fine-tune it on each manifest's support images (cells "
                    "cross_<--source-key>-<--key>/yolo_ft) instead of training from the YAML (kshot_<--key>/yolo)")
    ap.add_argument("--cross-source-val", metavar="VAL", help="the source's validation split (Ultralytics' final "
                    "validation; no selection)")
    ap.add_argument("--source-key", default="neu", help="dataset key of the source in the cells")
    ap.add_argument("--source-epochs", type=int, default=None, help="source training epochs (default 30)")
    ap.add_argument("--source-time-minutes", type=float, default=None,
                    help="source training for this wall time instead of --source-epochs (equal to a Detectron2 "
                         "source model's training time)")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=0, help="training seed of --in-domain")
    ap.add_argument("--neu-folds", type=int, default=0, metavar="K", help="register NEU-DET's K-fold splits "
                    "(neu_k<K>f<i>_{train,val,test}, as benchmarks/bench_recipe.py --folds K) to name them")
    ap.add_argument("--train", default="neu_synth_train")
    ap.add_argument("--val", default="neu_synth_val", help="split for Ultralytics' final validation (no selection)")
    ap.add_argument("--test", default="neu_synth_test")
    ap.add_argument("--key", default="neu", help="dataset key of the cells (setting kshot_<key>)")
    ap.add_argument("--out", default="output/fewshot_synth", help="protocol output folder for the K-shot cells")
    ap.add_argument("--work", default="output/yolo", help="exports, runs and evaluator files of --in-domain")
    ap.add_argument("--model", default="yolo11n.yaml", help="packaged Ultralytics model YAML (built from scratch)")
    ap.add_argument("--epochs", type=int, default=None, help="default: 30 in-domain, 40 K-shot")
    ap.add_argument("--time-minutes", type=float, default=None,
                    help="--in-domain: train for this wall time instead of --epochs (Ultralytics' `time`, which fits "
                         "the epochs and LR schedule to it), for a row at the same wall budget as a Detectron2 row")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nbs", type=int, default=0, help="nominal batch size (default: --batch, so one optimizer "
                    "step per batch; Ultralytics' own default 64 accumulates 8 batches per step)")
    ap.add_argument("--conf", type=float, default=0.001)
    ap.add_argument("--max-det", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for training and prediction")
    ap.add_argument("--data", default=None, help="also register the datasets under this folder (e.g. ../shared/data "
                                                "for the real neu_train/neu_val/neu_test)")
    ap.add_argument("--save-as", default="yolo", help="results file benchmarks/results/<NAME>.json")
    ap.add_argument("--overwrite", action="store_true", help="redo existing K-shot cells")
    ap.add_argument("--allow-network", action="store_true", help="do not block sockets (they are not needed)")
    ap.add_argument("--verbose", action="store_true", help="Ultralytics' own training and validation output")
    args = ap.parse_args(argv)
    if not (args.in_domain or args.kshot_manifests):
        ap.error("pick --in-domain and/or --kshot-manifests DIR")
    if args.cross_source and not (args.kshot_manifests and args.cross_source_val):
        ap.error("--cross-source needs --kshot-manifests DIR and --cross-source-val VAL")

    if importlib.util.find_spec("ultralytics") is None:
        print(f"[bench_yolo] skipped: ultralytics is not installed (an optional benchmark dependency). "
              f"Install it with: {INSTALL}")
        return 0
    if not args.allow_network:
        block_network()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, save, synthetic_datasets  # noqa: E402  (imports torch, detectron2, steel_fsd)
    import torch

    torch.set_num_threads(args.threads)
    ultralytics = prepare_ultralytics(Path(args.work) / "ultralytics_config", args.threads, args.verbose)
    synthetic_datasets()
    if args.data:
        from steel_fsd.data import register_all
        register_all(args.data)
        if args.neu_folds:  # --train neu_k3f0_train --val neu_k3f0_val --test neu_k3f0_test: bench_recipe's folds
            from steel_fsd.data.catalog import register_neu_folds
            register_neu_folds(Path(args.data) / "neu-det", args.neu_folds)

    previous = RESULTS / f"{args.save_as}.json"
    result = {k: v for k, v in json.loads(previous.read_text()).items() if k in ("in_domain", "kshot", "cross")} \
        if previous.is_file() else {}
    settings = {"model": args.model, "imgsz": args.imgsz, "batch": args.batch, "nbs": args.nbs or args.batch,
                "conf": args.conf, "max_det": args.max_det, "threads": args.threads, "pretrained": False,
                "amp": False, "optimizer": "auto (Ultralytics default)"}
    if args.in_domain:
        a = argparse.Namespace(**vars(args))
        a.epochs = args.epochs or 30
        result["in_domain"] = dict(in_domain(a), settings=dict(settings, epochs=a.epochs, time_minutes=a.time_minutes))
    if args.kshot_manifests:
        a = argparse.Namespace(**vars(args))
        a.epochs = args.epochs or 40
        if args.cross_source:
            weights, info = source_model(args)
            result["cross"] = dict(manifest_cells(a, weights, info), source_model=info,
                                   settings=dict(settings, epochs=a.epochs))
        else:
            result["kshot"] = dict(manifest_cells(a), settings=dict(settings, epochs=a.epochs))
    table = markdown(result)
    print("\n" + table + "\n")
    save(args.save_as, {"ultralytics": ultralytics.__version__, "install": INSTALL, "network_attempts": NETWORK_ATTEMPTS,
                  "markdown": table, **result})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from steel_fsd.utils.cli import run_main  # a user error (e.g. an unregistered split) is one line, exit 2

    sys.exit(run_main(main))
