#!/usr/bin/env python
"""Run the few-shot protocol: every (setting, method, K, seed) cell, then the tables and plots.

    python tools/run_fewshot.py --config configs/protocols/synth_cpu.yaml [--shots 1 5 10] [--seeds 0..4] \
        [--cross neu->severstal] [--settings base_novel cross kshot] [--only NAME ...] [--list] \
        [--methods prototype finetune] [--no-variants | --variants-only] [--out DIR] [--datasets-root DIR] \
        [--report-only]

Resumable: finished cells (``OUT/cells/**.json``) and trained models are reused; an interrupted training
resumes from its last checkpoint. Writes ``OUT/results.json``, ``OUT/results.csv``, ``OUT/report.md``
(the tables, also printed) and ``OUT/plots/*.png``. See steel_fsd/fewshot/protocol/ for the settings.
"""
from __future__ import annotations

import argparse
import json
import sys

import _path  # noqa: F401
from detectron2.utils.logger import setup_logger

from steel_fsd.data import register_datasets
from steel_fsd.utils.cli import add_dataset_args
from steel_fsd.fewshot.protocol import Protocol
from steel_fsd.utils.cli import UserError, run_main

def seeds_arg(values: list[str]) -> list[int]:
    """``["0..4"]`` -> [0, 1, 2, 3, 4]; ``["0", "2"]`` -> [0, 2]."""
    out: list[int] = []
    for v in values:
        lo, sep, hi = v.partition("..")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(v)]
        except ValueError:
            raise UserError(f"--seeds {v!r} is not a seed or a range", "", "write seeds as 0 1 2 or 0..4") from None
        if sep and int(hi) < int(lo):
            raise UserError(f"--seeds {v!r} is an empty range", "", "write the lower seed first, e.g. 0..4")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="protocol file (configs/protocols/*.yaml)")
    ap.add_argument("--shots", type=int, nargs="+", help="K values (default: the file's SHOTS)")
    ap.add_argument("--seeds", nargs="+", help="seeds, e.g. 0 1 2 or 0..4 (default: the file's SEEDS)")
    ap.add_argument("--cross", nargs="+", help="only these cross-dataset directions, e.g. neu->severstal")
    ap.add_argument("--settings", nargs="+", choices=("base_novel", "cross", "kshot"), help="only these kinds")
    ap.add_argument("--only", nargs="+", help="only these settings, by the names --list prints")
    ap.add_argument("--list", action="store_true", help="print the settings and the number of cells, run nothing")
    ap.add_argument("--methods", nargs="+", help="only these methods (default: all of the file's)")
    ap.add_argument("--no-variants", action="store_true", help="skip the VARIANTS rows (ablations, preprocessing, "
                    "full-data bounds)")
    ap.add_argument("--variants-only", action="store_true", help="run only the VARIANTS rows (e.g. the full-data "
                    "upper bounds), no cell")
    ap.add_argument("--out", help="output folder (default: the file's OUTPUT_DIR)")
    ap.add_argument("--datasets-root", help="datasets folder to register (default $STEEL_FSD_DATASETS, else ./datasets)")
    add_dataset_args(ap)
    ap.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from finished cells")
    args = ap.parse_args(argv)
    setup_logger(name="steel_fsd")
    setup_logger(name="detectron2", abbrev_name="d2")
    register_datasets(args.datasets_root, args.dataset, args.datasets_file)
    protocol = Protocol(args.config, args.out, args.shots, seeds_arg(args.seeds) if args.seeds else None, args.methods)
    settings = protocol.select(args.settings, args.cross, args.only)
    if args.list:
        for s in protocol.settings:
            print(f"{s.name}  ({s.kind}: {s.source} -> {s.target}{', novel ' + str(list(s.novel)) if s.novel else ''})"
                  f"{'' if s in settings else '  [not selected]'}")
        print(f"{len(protocol.cells(settings))} cells: methods {list(protocol.methods)}, K {protocol.shots}, "
              f"seeds {protocol.seeds}; variant rows: {sum(len(r) for r in protocol.variants.values())}")
        return 0
    if args.no_variants and args.variants_only:
        raise UserError("--no-variants and --variants-only exclude each other", "", "give one of them")
    report = protocol.report() if args.report_only else \
        protocol.run(settings, variants=not args.no_variants, cells=not args.variants_only)
    print(report["markdown"])
    print(json.dumps({"results": str(protocol.out / "results.json"), "plots": report["plots"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
