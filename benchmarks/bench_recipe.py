"""Recipe study on the real NEU-DET images: every harmonization/augmentation step, schedule and sampling
choice on its own, at one training budget, several seeds per row, chosen on neu_val, reported on neu_test.

    python benchmarks/bench_recipe.py [--rows paper flips_only ...] [--seeds 0 1] [--iters 300] [--jobs 2]
    python benchmarks/bench_recipe.py --list            # the rows and their overrides
    python benchmarks/bench_recipe.py --report-only     # the table from the finished runs
    python benchmarks/bench_recipe.py --rows default proto_default --weights output/pretrain/r18_simclr.pth
                                                        # rows "default+r18_simclr": from a pretrained backbone
    python benchmarks/bench_recipe.py --rows default --seeds 0 --folds 3 --iters 2500
                                                        # k-fold: every image tested once, mean over folds

Each row is a config (the stock or prototype CPU config) plus overrides, trained from scratch on neu_train
with Detectron2's SEED set to the run's seed, for ``--iters`` iterations at batch 4 (rows with another
batch size get the iterations that cost the same wall time), then evaluated on neu_val and neu_test. Runs
go ``--jobs`` at a time in subprocesses with one thread each (two use the 2-core machine fully), seeds
first, so every row started gets its seeds before the next row starts. Resumable: a finished run's
``result.json`` is reused and an interrupted one resumes from its checkpoint. Writes
``benchmarks/results/recipe_neu.json``: every run (row, config, overrides, seed, iterations, wall time,
val and test rows) and per row the mean +- 95% CI over seeds.

``--folds K`` replaces the fixed split by the K folds of a seeded, class-stratified K-fold split of all NEU-DET
images (``neu_k<K>f<i>_{train,val,test}``: each image is in one fold's test split; each fold's validation split
is 15% of its other images): every (row, seed, fold) is one run, and a row's numbers are the mean +- 95% CI over
seeds and folds, recorded in ``recipe_neu_k<K>_it<iters>.json``. Choices are read on the validation splits.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = "configs/paper/faster_rcnn_R18_FPN_GN_neu_cpu.yaml"  # every step on: the rows below switch them
PAPER_PROTO = "configs/paper/proto_R18_FPN_GN_neu_cpu.yaml"
STOCK = "configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml"  # the defaults chosen from this table
PROTO = "configs/prototype/proto_R18_FPN_GN_neu_cpu.yaml"
OUT = REPO / "output" / "recipe_neu"
# The paper's recipe minus CLAHE, rotation, crop, gamma and noise: flips and dataset normalization kept.
FLIPS = ["INPUT.HARMONIZE.CLAHE", "False", "INPUT.AUG.ROTATION", "False", "INPUT.AUG.CROP", "False",
         "INPUT.AUG.GAMMA", "False", "INPUT.AUG.NOISE", "False"]
# name -> (config, overrides, iteration factor for the same wall time); in the order they are run.
ROWS: dict[str, tuple[str, list[str], float]] = {
    "paper": (PAPER, [], 1.0),
    "flips_only": (PAPER, FLIPS, 1.0),
    "proto_paper": (PAPER_PROTO, [], 1.0),
    "proto_flips_only": (PAPER_PROTO, FLIPS, 1.0),
    "flips+clahe": (PAPER, FLIPS + ["INPUT.HARMONIZE.CLAHE", "True"], 1.0),
    "flips+rotation30": (PAPER, FLIPS + ["INPUT.AUG.ROTATION", "True"], 1.0),
    "flips+crop": (PAPER, FLIPS + ["INPUT.AUG.CROP", "True"], 1.0),
    "flips+gamma": (PAPER, FLIPS + ["INPUT.AUG.GAMMA", "True"], 1.0),
    "flips+noise": (PAPER, FLIPS + ["INPUT.AUG.NOISE", "True"], 1.0),
    "flips-normalize": (PAPER, FLIPS + ["INPUT.HARMONIZE.NORMALIZE", "False"], 1.0),
    "flips+clahe-normalize": (PAPER, FLIPS + ["INPUT.HARMONIZE.CLAHE", "True", "INPUT.HARMONIZE.NORMALIZE", "False"], 1.0),
    "no_augmentation": (PAPER, FLIPS + ["INPUT.AUG.ENABLED", "False"], 1.0),
    "flips_hflip_only": (PAPER, FLIPS + ["INPUT.AUG.VFLIP", "False"], 1.0),
    "flips_lr0.01": (PAPER, FLIPS + ["SOLVER.BASE_LR", "0.01"], 1.0),
    "flips_lr0.04": (PAPER, FLIPS + ["SOLVER.BASE_LR", "0.04"], 1.0),
    "flips_batch2_lr0.01": (PAPER, FLIPS + ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01"], 2.0),
    "flips+clahe_batch2_lr0.01": (PAPER, FLIPS + ["INPUT.HARMONIZE.CLAHE", "True", "SOLVER.IMS_PER_BATCH", "2",
                                                  "SOLVER.BASE_LR", "0.01"], 2.0),
    "flips_anchors8-128": (PAPER, FLIPS + ["MODEL.ANCHOR_GENERATOR.SIZES", "[[8],[16],[32],[64],[128]]"], 1.0),
    # the configs' ratios are [0.25, 0.5, 1, 2, 4] (elongated defects): this row is Detectron2's default
    "flips_ratios0.5-2": (PAPER, FLIPS + ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[0.5,1.0,2.0]]"], 1.0),
    "flips_roi256_fg0.5": (PAPER, FLIPS + ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "256",
                                           "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.5"], 1.0),
    "flips_rpn128": (PAPER, FLIPS + ["MODEL.RPN.BATCH_SIZE_PER_IMAGE", "128"], 1.0),
    "flips_resize320": (PAPER, FLIPS + ["INPUT.HARMONIZE.RESIZE", "320"], 0.4),
    # the shipped defaults (stock, and the prototype head on the same recipe)
    "default": (STOCK, [], 1.0),
    "proto_default": (PROTO, [], 1.0),
    # the screen's one clear winner (flips+clahe_batch2_lr0.01) applied to both shipped configs; the episodic
    # sampler draws EPISODE_CLASSES x EPISODE_IMAGES_PER_CLASS images per batch, so 2 classes for batch 2
    "default_batch2": (STOCK, ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01"], 2.0),
    "proto_default_batch2": (PROTO, ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01",
                                     "DATALOADER.EPISODE_CLASSES", "2"], 2.0),
    "proto_default_paper_logits": (PROTO, ["MODEL.PROTOTYPE.LOGIT", "distance"], 1.0),
    "proto_default_plain_sampler": (PROTO, ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler"], 1.0),
    # prototype-head candidates, each one change to the shipped prototype config (four more that lost, a triplet
    # warm-up, absent classes masked, learned prototypes and a background prototype, were removed from the head;
    # their rows stay in benchmarks/results/recipe_neu.json)
    "proto_default_paper_head": (PROTO, ["MODEL.PROTOTYPE.LOGIT", "distance", "MODEL.PROTOTYPE.EMBED_NORM", "",
                                         "MODEL.PROTOTYPE.TRIPLET_WEIGHT", "1.0"], 1.0),
    "proto_default_triplet0": (PROTO, ["MODEL.PROTOTYPE.TRIPLET_WEIGHT", "0.0"], 1.0),
    "proto_default_triplet1": (PROTO, ["MODEL.PROTOTYPE.TRIPLET_WEIGHT", "1.0"], 1.0),
    "proto_default_momentum0.99": (PROTO, ["MODEL.PROTOTYPE.MOMENTUM", "0.99"], 1.0),
    "proto_default_momentum0.5": (PROTO, ["MODEL.PROTOTYPE.MOMENTUM", "0.5"], 1.0),
    "proto_default_tau20_range4-64": (PROTO, ["MODEL.PROTOTYPE.TAU_INIT", "20.0",
                                              "MODEL.PROTOTYPE.TAU_RANGE", "[4.0, 64.0]"], 1.0),
    "proto_default_tlsdd": (PROTO, ["MODEL.PROTOTYPE.REWEIGHT_HIDDEN", "64"], 1.0),  # TL-SDD's reweighting
    # what YOLO11n does that the shipped stock recipe does not, each on its own
    "default_giou": (STOCK, ["MODEL.RPN.BBOX_REG_LOSS_TYPE", "giou", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou",
                             "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "2.0"], 1.0),
    "default_ema": (STOCK, ["MODEL_EMA.ENABLED", "True"], 1.0),
    "default_tta_flip": (STOCK, ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(200,)", "TEST.AUG.FLIP", "True"], 1.0),
    # scratches are long and thin: anchors up to 1:10
    "default_ratios0.1-10": (STOCK, ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[0.1,0.25,0.5,1.0,2.0,4.0,10.0]]"], 1.0),
    # DeFRCN's gradient-decoupled layers (RPN 0, ROI heads 0.75 of their gradient into the backbone)
    # augmentations that mix images, and multi-scale training (YOLO trains with mosaic and scale jitter)
    "default_mosaic": (STOCK, ["INPUT.AUG.MOSAIC_PROB", "0.5"], 1.0),
    "default_copy_paste": (STOCK, ["INPUT.AUG.COPY_PASTE_PROB", "0.5"], 1.0),
    "default_multiscale": (STOCK, ["INPUT.AUG.SCALES", "[160, 200, 240]"], 1.0),
    "default_gdl": (STOCK, ["MODEL.META_ARCHITECTURE", "DecoupledRCNN"], 1.0),
    "proto_default_gdl": (PROTO, ["MODEL.META_ARCHITECTURE", "DecoupledRCNN"], 1.0),
    "default_cascade": (STOCK, ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
                                "True"], 1.0),
}
METRICS = ("AP", "AP50", "AP75", "P", "R", "F1", "F1_valthr")  # F1_valthr: at the threshold best on neu_val


def row_name(row: str, weights: str = "") -> str:
    """A row trained from a pretrained backbone (``--weights``) is reported as ``<row>+<weights file stem>``."""
    return f"{row}+{Path(weights).stem}" if weights else row


def base_row(name: str) -> str:
    """The ROWS entry of a reported row name (``<row>`` or ``<row>+<weights stem>``; row names may hold "+")."""
    return name if name in ROWS else name.rsplit("+", 1)[0]


def run_dir(row: str, seed: int, iters: int, weights: str = "", folds: int = 0, fold: int = 0) -> Path:
    leaf = f"seed{seed}" + (f"_fold{fold}of{folds}" if folds else "")
    return OUT / f"it{iters}" / row_name(row, weights) / leaf


def split_names(folds: int = 0, fold: int = 0) -> dict[str, str]:
    """The dataset names of a run: the fixed split, or fold ``fold`` of the ``folds``-fold split."""
    from steel_fsd.data.catalog import neu_fold_names

    return neu_fold_names(folds, fold) if folds else {s: f"neu_{s}" for s in ("train", "val", "test")}


def schedule(iters: int) -> list[str]:
    """MAX_ITER and LR steps (75% and 90%) for ``iters`` iterations, warm-up capped at a tenth of them."""
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.75)}, {int(iters * 0.9)})",
            "SOLVER.WARMUP_ITERS", str(min(50, iters // 10)), "SOLVER.CHECKPOINT_PERIOD", str(max(50, iters // 4))]


def train_one(row: str, seed: int, iters: int, data: str, eval_period: int = 0, weights: str = "", folds: int = 0,
              fold: int = 0) -> dict:
    """Train and evaluate one (row, seed) in this process; the result is also written to its folder.

    With ``eval_period`` the model is evaluated on neu_val every that many iterations at batch 4 (the
    convergence curve, read back from Detectron2's metrics.json; a row with an iteration factor is evaluated
    after the same number of images) and on neu_test once, at the end.
    """
    sys.path.insert(0, str(REPO))
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.utils.logger import setup_logger

    from steel_fsd.data import register_all
    from steel_fsd.engine.setup import build_config, finalize_config
    from steel_fsd.engine.trainer import Trainer, evaluate
    from steel_fsd.evaluation.prf import f1_at_chosen_threshold
    from steel_fsd.evaluation.report import per_class_rows

    register_all(data)
    if folds:
        from steel_fsd.data.catalog import register_neu_folds

        register_neu_folds(Path(data) / "neu-det", folds)
    names = split_names(folds, fold)
    config, opts, factor = ROWS[row]
    out = run_dir(row, seed, iters, weights, folds, fold)
    n = int(round(iters * factor))
    opts = opts + (["MODEL.WEIGHTS", str(Path(weights).resolve())] if weights else [])
    full = opts + schedule(n) + ["SEED", str(seed), "OUTPUT_DIR", str(out), "DATALOADER.NUM_WORKERS", "0",
                                 "DATASETS.TRAIN", f"('{names['train']}',)",
                                 "DATASETS.TEST", f"('{names['val']}',)" if eval_period
                                 else f"('{names['val']}', '{names['test']}')",
                                 "TEST.EVAL_PERIOD", str(int(round(eval_period * factor)))]
    cfg = build_config(str(REPO / config), full)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("detectron2", "fvcore", "steel_fsd"):
        setup_logger(str(out), name=name)
    finalize_config(cfg)
    start = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    results = trainer.train()
    if eval_period:
        test_cfg = cfg.clone()
        test_cfg.defrost()
        test_cfg.DATASETS.TEST = (names["test"],)
        results.update(evaluate(test_cfg, trainer.model))
    rows = {s: per_class_rows(results[names[s]], MetadataCatalog.get(names[s]).thing_classes) for s in ("val", "test")}
    threshold, f1 = f1_at_chosen_threshold(results[names["val"]]["prf"], results[names["test"]]["prf"])
    rows["test"][-1]["F1_valthr"] = round(f1, 2)
    result = {"row": row_name(row, weights), "config": config, "opts": opts, "seed": seed, "iterations": n,
              "batch": cfg.SOLVER.IMS_PER_BATCH, "threads": torch.get_num_threads(),
              "wall_s": round(time.time() - start), "val": rows["val"][-1], "test": rows["test"][-1],
              "val_threshold": threshold, **({"folds": folds, "fold": fold} if folds else {}),
              "test_per_class": rows["test"][:-1], "curve": curve(out, n) if eval_period else None}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def curve(out: Path, max_iter: int) -> dict:
    """Validation AP/AP50 at each evaluation and the smoothed training loss, from Detectron2's metrics.json."""
    evals, loss = [], []
    for line in (out / "metrics.json").read_text().splitlines():
        rec = json.loads(line)
        if "bbox/AP50" in rec:
            evals.append({"iter": min(rec["iteration"] + 1, max_iter),  # the final eval is logged at max_iter
                           "AP": rec["bbox/AP"], "AP50": rec["bbox/AP50"]})
        if "total_loss" in rec:
            loss.append({"iter": rec["iteration"] + 1, "total_loss": rec["total_loss"]})
    return {"val": evals, "loss": loss}


def plot_curves(runs: list[dict], path: Path) -> Path | None:
    """Validation AP50 against iterations next to the training loss, one line per (row, seed)."""
    runs = [r for r in runs if r.get("curve")]
    if not runs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        label = f"{r['row']} seed {r['seed']}"
        scale = r.get("batch", 4) / 4  # x: images seen / 4, so batch-2 rows line up with batch-4 ones
        v = r["curve"]["val"]
        a.plot([e["iter"] * scale for e in v], [e["AP50"] for e in v], marker="o", label=label)
        ls = r["curve"]["loss"]
        b.plot([e["iter"] * scale for e in ls], [e["total_loss"] for e in ls], label=label, alpha=0.8)
    x = "iterations at batch 4 (images seen / 4)"
    a.set(xlabel=x, ylabel="neu_val AP50", title="validation AP50")
    b.set(xlabel=x, ylabel="total loss (20-iteration median)", title="training loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(runs: list[dict]) -> list[dict]:
    """Per row: seeds, and mean +- 95% CI of each metric on val and test, and of the wall time."""
    sys.path.insert(0, str(REPO))
    from steel_fsd.evaluation.aggregate import mean_ci

    out = []
    order = {name: i for i, name in enumerate(ROWS)}  # recorded rows whose option was removed go last
    for row, iters, folds in sorted({(r["row"], r["iterations"], r.get("folds", 0)) for r in runs},
                                    key=lambda k: (k[2], k[1], order.get(base_row(k[0]), len(order)), k[0])):
        rs = [r for r in runs if r["row"] == row and r["iterations"] == iters and r.get("folds", 0) == folds]
        entry = {"row": row, "config": rs[0]["config"], "opts": rs[0]["opts"], "iterations": rs[0]["iterations"],
                 "seeds": [r["seed"] for r in rs], "wall_s": mean_ci([r["wall_s"] for r in rs])}
        if folds:  # one value per (seed, fold) run
            entry.update(folds=folds, fold_of_run=[r["fold"] for r in rs])
        for split in ("val", "test"):
            entry[split] = {m: mean_ci([r[split].get(m) for r in rs]) for m in METRICS}  # older runs: no F1_valthr
        out.append(entry)
    return out


def table(summary: list[dict]) -> str:
    from tabulate import tabulate

    def fmt(ci: dict) -> str:
        if ci.get("mean") is None:
            return "-"
        half = ci.get("ci95")
        return f"{ci['mean']:.1f}" + (f" +- {half:.1f}" if half is not None else "")

    rows = [[s["row"], len(s["seeds"]), s["iterations"], fmt(s["val"]["AP50"]), fmt(s["test"]["AP50"]),
             fmt(s["test"]["AP"]), fmt(s["test"]["F1"]), fmt(s["test"]["F1_valthr"]), fmt(s["wall_s"])]
            for s in summary]
    return tabulate(rows, headers=["row", "runs (seeds x folds)", "iters", "val AP50", "test AP50", "test AP", "test F1",
                                   "test F1 (val thr)", "wall s"], tablefmt="github")


def finished(iters: int, name: str, folds: int = 0) -> list[dict]:
    """The runs finished under output/ plus those recorded in ``benchmarks/results/<name>.json`` that were
    not re-run (the output folder can be gone while the record stays); only runs of the fixed split, or of
    the ``folds``-fold split."""
    def key(r: dict) -> tuple:
        return r["row"], r["seed"], r["iterations"], r.get("fold")

    fresh = [r for p in sorted((OUT / f"it{iters}").glob("*/seed*/result.json"))
             if (r := json.loads(p.read_text())).get("folds", 0) == folds]
    record = REPO / "benchmarks" / "results" / f"{name}.json"
    done = {key(r) for r in fresh}
    old = json.loads(record.read_text()).get("runs", []) if record.is_file() else []
    return [r for r in old if key(r) not in done] + fresh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--iters", type=int, default=300, help="iterations at batch 4 (the wall budget)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--eval-period", type=int, default=0,
                    help="evaluate on neu_val every N iterations (convergence curve; neu_test once at the end)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder holding neu-det/")
    ap.add_argument("--weights", default="", help="start every row from these weights (e.g. a pretrained backbone "
                                                  "from tools/pretrain_backbone.py): rows named <row>+<file stem>")
    ap.add_argument("--folds", type=int, default=0, help="K-fold mode: every (row, seed) on each of K folds")
    ap.add_argument("--fold", type=int, default=0, help=argparse.SUPPRESS)  # the fold of --run
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--run", nargs=2, metavar=("ROW", "SEED"), help=argparse.SUPPRESS)  # one run (subprocess)
    args = ap.parse_args()
    if args.folds == 1 or args.folds < 0:
        ap.error(f"--folds {args.folds}: give 0 (the fixed split) or at least 2")
    if args.list:
        for name, (config, opts, factor) in ROWS.items():
            print(f"{name}: {config} {' '.join(opts)}" + (f" (x{factor} iterations)" if factor != 1 else ""))
        return
    if args.run:
        train_one(args.run[0], int(args.run[1]), args.iters, args.data, args.eval_period, args.weights,
                  args.folds, args.fold)
        return
    if not args.report_only:
        todo = [(r, s, f) for s in args.seeds for f in range(max(args.folds, 1)) for r in args.rows  # seed-major
                if not (run_dir(r, s, args.iters, args.weights, args.folds, f) / "result.json").is_file()]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        start = time.time()

        def launch(row: str, seed: int, fold: int) -> tuple[str, int, int]:
            log = run_dir(row, seed, args.iters, args.weights, args.folds, fold)
            log.mkdir(parents=True, exist_ok=True)
            with open(log / "stdout.log", "a") as f:
                rc = subprocess.run([sys.executable, __file__, "--run", row, str(seed), "--iters", str(args.iters),
                                     "--data", args.data, "--eval-period", str(args.eval_period),
                                     "--folds", str(args.folds), "--fold", str(fold),
                                     *(["--weights", args.weights] if args.weights else [])], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
            return f"{row}" + (f" fold {fold}" if args.folds else ""), seed, rc

        print(f"[bench_recipe] {len(todo)} runs to do ({args.jobs} at a time), output under {OUT}", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(launch, r, s, f) for r, s, f in todo]
            for i, fut in enumerate(as_completed(futures), 1):
                row, seed, rc = fut.result()
                el = time.time() - start
                print(f"[bench_recipe] {i}/{len(todo)} {row} seed {seed}: {'ok' if rc == 0 else f'FAILED rc={rc}'}"
                      f" (elapsed {el / 60:.0f} min, ETA {el / i * (len(todo) - i) / 60:.0f} min)", flush=True)
    name = "recipe_neu" + (f"_k{args.folds}" if args.folds else "") + ("" if args.iters == 300 and not args.folds
                                                                        else f"_it{args.iters}")
    runs = finished(args.iters, name, args.folds)
    summary = summarize(runs)
    best = max((s for s in summary if s["val"]["AP50"]["mean"] is not None),
               key=lambda s: s["val"]["AP50"]["mean"], default=None)
    sys.path.insert(0, str(Path(__file__).parent))
    from common import save

    png = plot_curves(runs, REPO / "benchmarks" / "results" / f"{name}_curves.png")
    save(name, {"iterations_at_batch4": args.iters, "curves_png": str(png.relative_to(REPO)) if png else None,
                "data": args.data, "split": (f"{args.folds}-fold stratified split of all images (seed 0): "
                                             "neu_k<K>f<i>_train -> _val / _test" if args.folds
                                             else "neu_train -> neu_val / neu_test"),
                "chosen_on_val": best["row"] if best else None, "rows": summary, "runs": runs})
    every = [r for p in sorted((REPO / "benchmarks" / "results").glob("recipe_neu*.json"))
             for r in json.loads(p.read_text()).get("runs", [])]
    save("real_neu", {"data": args.data, "split": "neu_train -> neu_val / neu_test",
                      "note": "every finished run of benchmarks/bench_recipe.py, all budgets (iterations at batch 4); "
                              "rows: mean +- 95% CI over seeds (and folds) per (row, iterations, folds)",
                      "rows": summarize(every), "runs": every})
    print(table(summary))


if __name__ == "__main__":
    main()
