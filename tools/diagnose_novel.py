#!/usr/bin/env python
"""Why are novel classes missed? RPN recall of their boxes and what the detector calls them, per class.

    python tools/diagnose_novel.py --config-file CFG --weights W.pth [--prototypes P.pt] --dataset neu_val \
        --novel inclusion patches [--out diagnosis.json]

For every ground-truth box of ``--dataset``: proposed by the RPN within the top 100 / 300 proposals (IoU >= 0.5)?
Then the best-scoring detection over it (score >= 0.05, IoU >= 0.5): the right class, a base class (which one),
another novel class, or none (background). Prints a table per class (novel first) and writes it as JSON.
"""
import sys

import _path  # noqa: F401
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from steel_fsd.data import dataset_name, register_datasets
from steel_fsd.data.catalog import require_registered
from steel_fsd.inference.diagnose import diagnose
from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.engine.loading import load_model_for_eval
from steel_fsd.utils.cli import DATASET_NAME_HELP, add_config_overrides, check_output_file, model_parser, run_main
from steel_fsd.utils.io import write_json


def main(argv=None) -> int:
    ap = model_parser(__doc__, prototypes="prototype file: the model predicts its classes (prototype swap)",
                      datasets_root=True)
    ap.add_argument("--dataset", required=True, help="registered dataset with boxes (a val split)" + DATASET_NAME_HELP)
    ap.add_argument("--novel", nargs="*", default=[], help="the novel class names (none: every class is judged "
                                                          "as a base class, e.g. for a fully supervised model)")
    ap.add_argument("--out", help="JSON to write (table and per-box records)")
    args = add_config_overrides(ap).parse_args(argv)
    setup_logger(name="steel_fsd")
    register_datasets(args.datasets_root, files=args.datasets_file)
    args.dataset = dataset_name(args.dataset)
    require_registered(args.dataset, "--dataset")
    if args.out:
        check_output_file(args.out, "--out")
    # the model must predict the dataset's classes: its own, or a prototype file's reordered to them
    cfg = build_config(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", args.weights, "MODEL.PROTOTYPE.SUPPORT_FILE",
                                                            args.prototypes or "", "DATASETS.TEST", f"('{args.dataset}',)"])
    finalize_config(cfg, datasets=(), weights=args.weights, swap=bool(args.prototypes))
    model = load_model_for_eval(cfg)
    table, records = diagnose(model, cfg, args.dataset, args.novel)
    print(tabulate(table, headers="keys", floatfmt=".1f", tablefmt="github"))
    if args.out:
        write_json(args.out, {"dataset": args.dataset, "weights": args.weights, "prototypes": args.prototypes,
                              "novel": args.novel, "table": table, "records": records}, indent=1, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
