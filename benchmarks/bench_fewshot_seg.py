#!/usr/bin/env python
"""Few-shot segmentation of unseen defect classes, fold by fold: each class is novel once.

    python benchmarks/bench_fewshot_seg.py --dataset mt --data ../shared/data --steps 400 --shots 1 5 \
        --seeds 0 1 2 3 4 [--fold blowhole] [--save-as fewshot_seg_mt] [--context] [--memory 32] [--distill 0.5]

Per fold (novel class): a FewShotSegmenter (the detector's R18-FPN GroupNorm backbone from scratch, 200 px) is
trained on episodes of the other classes of ``<dataset>_train`` (every image holding the novel class left out),
saved, and evaluated on every ``<dataset>_val`` and ``<dataset>_test`` image of the novel class (choose on val,
report test) with K support images drawn per query
and seed from ``<dataset>_train``: the response-weighted decoder (the model), the same decoder on plain
masked-average prototypes, PANet-style non-parametric prediction, and a 1x1 head fine-tuned on the K support
masks on the same backbone. Folds are resumable (``OUT/fold_<class>/``); ``--fold`` runs one (two processes can
share the folds). The report pools the folds present: per method and K, per-class IoU, mIoU and FB-IoU as
mean +- 95% CI over seeds, written to ``benchmarks/results/<save-as>.json``. ``--context``, ``--memory`` and
``--distill`` switch on the segmenter's query-context adaptation, cross-episode memory and attention
distillation; ``--freeze-backbone`` trains the rest on cached features of the (e.g. ``--backbone``) backbone; ``--weights-from DIR`` evaluates another run's fold models instead of training (e.g. context
adaptation at test time only, on a model trained without it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, save  # noqa: E402

CONFIG = "configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml"


def run_fold(args, novel_name: str, out: Path) -> dict:
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from steel_fsd.data.segmentation import fold_split
    from steel_fsd.engine.setup import build_config
    from steel_fsd.fewshot.segmentation import THRESHOLDS, evaluate_fold, load_examples, train_episodes
    from steel_fsd.modeling.fewshot_seg import FewShotSegmenter

    names = list(MetadataCatalog.get(f"{args.dataset}_train").thing_classes)
    novel = names.index(novel_name)
    folder = out / f"fold_{novel_name}"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "scores.json"
    if record.is_file():
        return json.loads(record.read_text())
    cfg = build_config(str(REPO / CONFIG), ["MODEL.DEVICE", "cpu", "INPUT.HARMONIZE.RESIZE", str(args.size)])
    train_dicts = DatasetCatalog.get(f"{args.dataset}_train")
    t0 = time.perf_counter()
    train_ex = load_examples(cfg, train_dicts)
    evals = {split: load_examples(cfg, DatasetCatalog.get(f"{args.dataset}_{split}")) for split in ("val", "test")}
    load_s = time.perf_counter() - t0
    base, excluded = fold_split(train_dicts, novel)
    torch.manual_seed(args.train_seed)
    model = FewShotSegmenter(cfg, pooling="response", context=args.context, memory=args.memory)
    if args.backbone:  # a detector trained on another line (it has never seen this dataset's classes)
        model.load_backbone(args.backbone)
    weights = (Path(args.weights_from) / f"fold_{novel_name}" if args.weights_from else folder) / "model.pth"
    if args.weights_from and not weights.is_file():
        raise SystemExit(f"--weights-from: {weights} not found (run that fold first)")
    t0 = time.perf_counter()
    if weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        losses = json.loads((weights.parent / "losses.json").read_text())
    else:
        losses = train_episodes(model, train_ex, base, args.steps, batch=args.batch, shots=1, lr=args.lr,
                                seed=args.train_seed, distill=args.distill, freeze_backbone=args.freeze_backbone)
        torch.save(model.state_dict(), weights)
        (folder / "losses.json").write_text(json.dumps(losses))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = {}
    for split, examples in evals.items():  # choices on val, numbers reported on test
        for k in args.shots:
            scores = evaluate_fold(model, train_ex, examples, novel, novel_name, k, args.seeds, thresholds=THRESHOLDS)
            results.setdefault(split, {})[str(k)] = {f"{m}/{s}/{t}": sc.state() for (m, s, t), sc in scores.items()}
    rec = {"novel": novel_name, "base_images": {names[c]: len(v) for c, v in base.items()},
           "excluded_train_images": len(excluded), "steps": args.steps, "batch": args.batch, "lr": args.lr,
           "size": args.size, "train_seed": args.train_seed, "backbone": args.backbone,
           "switches": {"context": args.context, "memory": args.memory, "distill": args.distill,
                        "freeze_backbone": args.freeze_backbone, "weights_from": args.weights_from}, "load_s": round(load_s, 1), "train_s": round(train_s, 1),
           "eval_s": round(time.perf_counter() - t0, 1), "final_loss": round(float(sum(losses[-50:]) / max(len(losses[-50:]), 1)), 4),
           "queries": {split: sum(novel in m for _, m in ex) for split, ex in evals.items()},
           "support_pool": sum(novel in m for _, m in train_ex),
           "scores": results}
    record.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def summaries(records: list[dict], classes: list[str], split: str) -> dict:
    """``{(method, K, threshold): row}`` on ``split``: per-class IoU, mIoU and FB-IoU, mean +- 95% CI over seeds
    (the folds pooled per seed)."""
    from steel_fsd.evaluation.aggregate import mean_ci
    from steel_fsd.evaluation.segmentation import SegmentationScores

    out = {}
    for k in sorted({k for r in records for k in r["scores"][split]}, key=int):
        keys = [key.split("/") for r in records for key in r["scores"][split].get(k, {})]
        for m in dict.fromkeys(key[0] for key in keys):
            for t in sorted({key[2] for key in keys if key[0] == m}, key=float):
                seeds = sorted({int(key[1]) for key in keys if key[0] == m and key[2] == t})
                per_seed = []
                for s in seeds:
                    sc = SegmentationScores()
                    for r in records:  # a fold without queries of its class in this split adds nothing
                        if f"{m}/{s}/{t}" in r["scores"][split].get(k, {}):
                            sc.merge(r["scores"][split][k][f"{m}/{s}/{t}"])
                    per_seed.append(sc.summary())
                out[(m, int(k), float(t))] = {
                    "method": m, "K": int(k), "threshold": float(t), "seeds": seeds,
                    "folds": [r["novel"] for r in records],
                    "mIoU": mean_ci([p["mIoU"] for p in per_seed]), "FB-IoU": mean_ci([p["FB-IoU"] for p in per_seed]),
                    "per_class": {c: mean_ci([p["per_class"].get(c) for p in per_seed]) for c in classes
                                  if any(c in p["per_class"] for p in per_seed)}}
    return out


def report(records: list[dict], classes: list[str]) -> dict:
    """Per method and K: the validation and test rows at probability 0.5, and the validation and test rows at the
    threshold with the best mean validation mIoU (the validation one is what switches are chosen on)."""
    val, test = summaries(records, classes, "val"), summaries(records, classes, "test")
    out = {"val_at_0.5": {}, "test_at_0.5": {}, "val_at_val_threshold": {}, "test_at_val_threshold": {}}
    for (m, k, t), row in test.items():
        if t == 0.5:
            out["test_at_0.5"][f"{m}, K={k}"] = row
            if (m, k, t) in val:
                out["val_at_0.5"][f"{m}, K={k}"] = val[(m, k, t)]
    for m, k in dict.fromkeys((m, k) for m, k, _ in test):
        options = [(row["mIoU"]["mean"], -t, t) for (mm, kk, t), row in val.items()
                   if (mm, kk) == (m, k) and row["mIoU"]["mean"] is not None]
        if options:
            best = max(options)[2]
            out["val_at_val_threshold"][f"{m}, K={k}"] = val[(m, k, best)]
            out["test_at_val_threshold"][f"{m}, K={k}"] = test[(m, k, best)]
    return out


def table(rows: dict) -> str:
    from tabulate import tabulate

    def fmt(ci):
        return "-" if ci["mean"] is None else f"{ci['mean']:.1f}" + (f" ± {ci['ci95']:.1f}" if ci["ci95"] else "")

    classes = list(dict.fromkeys(c for r in rows.values() for c in r["per_class"]))
    return tabulate([[r["method"], r["K"], r["threshold"], fmt(r["mIoU"]), fmt(r["FB-IoU"]),
                      *(fmt(r["per_class"][c]) if c in r["per_class"] else "-" for c in classes)]
                     for r in rows.values()], headers=["method", "K", "threshold", "mIoU", "FB-IoU", *classes],
                    tablefmt="github")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mt", help="registered <dataset>_train / _test with masks")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="datasets root")
    ap.add_argument("--fold", nargs="+", help="novel classes to run and report (default: every class)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=4, help="episodes per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size", type=int, default=200, help="harmonized image size")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="support selections")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--backbone", help="initialize the backbone from this detector's weights (trained on another "
                                       "dataset with the R18-FPN GN CPU config); default: from scratch")
    ap.add_argument("--context", action="store_true", help="query-context adaptation of the prototypes")
    ap.add_argument("--memory", type=int, default=0, help="cross-episode memory slots (0: off)")
    ap.add_argument("--distill", type=float, default=0.0, help="attention distillation loss weight (0: off)")
    ap.add_argument("--freeze-backbone", action="store_true",
                    help="train the decoder on cached features of a frozen backbone (many more steps per minute)")
    ap.add_argument("--weights-from", help="evaluate the fold models of this earlier --out folder (no training)")
    ap.add_argument("--out", help="default: output/fewshot_seg/<dataset>")
    ap.add_argument("--save-as", help="results name (default: fewshot_seg_<dataset>)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    from detectron2.data import MetadataCatalog

    from steel_fsd.data import register_all
    register_all(args.data)
    classes = list(MetadataCatalog.get(f"{args.dataset}_train").thing_classes)
    out = Path(args.out or REPO / "output" / "fewshot_seg" / args.dataset)
    folds = args.fold or classes
    unknown = [f for f in folds if f not in classes]
    if unknown:
        ap.error(f"--fold {unknown}: classes of {args.dataset} are {classes}")
    if not args.report_only:
        for i, f in enumerate(folds, 1):
            print(f"[bench_fewshot_seg] fold {i}/{len(folds)}: novel class {f}", flush=True)
            run_fold(args, f, out)
    records = [json.loads(p.read_text()) for c in folds if (p := out / f"fold_{c}" / "scores.json").is_file()]
    if not records:
        print("[bench_fewshot_seg] no finished fold", file=sys.stderr)
        return 1
    rows = report(records, classes)
    md = {name: table(r) for name, r in rows.items()}
    for name in md:
        print(f"\n{args.dataset}: {name}\n{md[name]}")
    if len(records) == len(folds):
        save(args.save_as or f"fewshot_seg_{args.dataset}",
             {"dataset": args.dataset, "data": args.data, "command": " ".join(sys.argv), "rows": rows,
              "folds": [{k: v for k, v in r.items() if k != "scores"} for r in records], "markdown": md})
    return 0


if __name__ == "__main__":
    sys.exit(main())
