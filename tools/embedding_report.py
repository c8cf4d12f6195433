#!/usr/bin/env python
"""Embedding report of a prototype model on a dataset's ground-truth boxes.

    python tools/embedding_report.py --config-file CFG --weights MODEL.pth --dataset neu_synth_test \
        [--support-file PROTOS.pt | --support-dataset NAME --shots K --seed S] [--max-per-class 50] --out DIR

Writes DIR/embedding_report.json (nearest-prototype confusion matrix, intra/inter-class distance
statistics), DIR/confusion.png and DIR/embeddings_pca.png (support, query embeddings and prototypes).
"""
import json
import os
import sys

import _path  # noqa: F401
import matplotlib
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from steel_fsd.data import dataset_name, register_datasets  # noqa: E402
from steel_fsd.data.catalog import require_registered  # noqa: E402
from steel_fsd.data.mapper import SteelDatasetMapper  # noqa: E402
from steel_fsd.engine.setup import build_config, finalize_config  # noqa: E402
from steel_fsd.engine.loading import load_model_for_eval  # noqa: E402
from steel_fsd.utils.cli import DATASET_NAME_HELP, add_config_overrides, check_output_dir, model_parser, run_main  # noqa: E402
from steel_fsd.utils.io import write_json  # noqa: E402
from steel_fsd.evaluation.embeddings import distance_stats, nearest_prototype_confusion, pca_2d  # noqa: E402
from steel_fsd.fewshot.support import sample_support  # noqa: E402
from steel_fsd.fewshot.adapt import build_prototypes, embed_instances  # noqa: E402
from steel_fsd.fewshot.prototypes import load_prototypes  # noqa: E402


def plot_confusion(cm: np.ndarray, names: list[str], path: str) -> None:
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("nearest prototype")
    ax.set_ylabel("true class")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pca(query, q_labels, support, s_labels, protos, names, path: str) -> None:
    coords, (mean, axes) = pca_2d(torch.cat([query, support]))
    q2, s2, p2 = coords[:len(query)], coords[len(query):], (protos - mean) @ axes
    fig, ax = plt.subplots(figsize=(7, 6))
    colors = plt.cm.tab10(np.arange(len(names)) % 10)
    for c, name in enumerate(names):
        ax.scatter(*q2[q_labels == c].T, s=8, alpha=0.4, color=colors[c], label=f"{name} (query)")
        if len(s2):
            ax.scatter(*s2[s_labels == c].T, s=40, marker="^", edgecolor="k", color=colors[c])
        ax.scatter(*p2[c], s=220, marker="*", edgecolor="k", color=colors[c])
    ax.set_title("ROI embeddings (PCA): dots query, triangles support, stars prototypes", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = model_parser(__doc__, prototypes=None, datasets_root=True)
    ap.add_argument("--dataset", required=True, help="query dataset (its ground-truth boxes are embedded)" + DATASET_NAME_HELP)
    ap.add_argument("--support-file", help="prototype file from register_support.py")
    ap.add_argument("--support-dataset", help="build prototypes from this dataset instead (with --shots/--seed)")
    ap.add_argument("--shots", type=int, default=5, help="K boxes per class (>= 1) with --support-dataset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-per-class", type=int, default=50, help="query boxes per class (seeded sample)")
    ap.add_argument("--out", required=True)
    args = add_config_overrides(ap).parse_args(argv)
    if args.shots < 1 or args.max_per_class < 1:
        ap.error(f"--shots {args.shots} and --max-per-class {args.max_per_class} must be at least 1")
    register_datasets(args.datasets_root, files=args.datasets_file)
    args.dataset = dataset_name(args.dataset)
    cfg = finalize_config(build_config(args.config_file, args.opts + ["MODEL.WEIGHTS", args.weights,
                                                                     "MODEL.PROTOTYPE.SUPPORT_FILE", ""]),
                          datasets=())  # only --dataset / --support-dataset are read
    require_registered(args.dataset, "--dataset")
    for name, option in ((args.support_dataset, "--support-dataset"),):
        if name:
            require_registered(name, option)
    check_output_dir(args.out, "--out")
    model = load_model_for_eval(cfg, check_classes=False)
    mapper = SteelDatasetMapper(cfg, is_train=False)
    names = list(MetadataCatalog.get(args.dataset).thing_classes)
    query = sample_support(DatasetCatalog.get(args.dataset), len(names), args.max_per_class, args.seed)
    zq = embed_instances(model, query, mapper, progress=True)
    lq = torch.tensor([d["annotations"][i]["category_id"] for d, i in query])
    zs, ls = torch.zeros(0, zq.shape[1]), torch.zeros(0, dtype=torch.long)
    if args.support_file:
        protos = load_prototypes(args.support_file).reordered(names).prototypes
    elif args.support_dataset:
        sdicts = DatasetCatalog.get(args.support_dataset)
        picks = sample_support(sdicts, len(names), args.shots, args.seed)
        zs = embed_instances(model, picks, mapper)
        ls = torch.tensor([d["annotations"][i]["category_id"] for d, i in picks])
        protos = build_prototypes(model, sdicts, names, mapper, args.shots, args.seed).prototypes
    else:
        protos = model.roi_heads.box_predictor.bank.cpu()
    os.makedirs(args.out, exist_ok=True)
    cm = nearest_prototype_confusion(zq, lq, protos)
    report = {"dataset": args.dataset, "classes": names, "confusion": cm.tolist(), "stats": distance_stats(zq, lq, protos)}
    write_json(os.path.join(args.out, "embedding_report.json"), report, indent=2, sort_keys=False)
    plot_confusion(cm, names, os.path.join(args.out, "confusion.png"))
    plot_pca(zq, lq, zs, ls, protos, names, os.path.join(args.out, "embeddings_pca.png"))
    print(json.dumps(report["stats"], indent=2))
    print(f"wrote {args.out}/embedding_report.json, confusion.png, embeddings_pca.png")


if __name__ == "__main__":
    sys.exit(run_main(main))
