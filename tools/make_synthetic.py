#!/usr/bin/env python
"""Write the procedural synthetic datasets in the published NEU-DET and Severstal layouts.

    python tools/make_synthetic.py --out datasets/synthetic [--neu-per-class 50] [--severstal-images 120]
                                   [--seed 0] [--only neu|severstal]

Writes ``OUT/neu-synth/`` (IMAGES/, ANNOTATIONS/) and ``OUT/severstal-synth/`` (train_images/,
train.csv), each with a README.txt and a ``synthetic.json`` of the parameters. A folder whose
``synthetic.json`` matches the requested parameters is kept (and says so); otherwise it is rebuilt.
A folder without ``synthetic.json`` is never deleted.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import _path  # noqa: F401  (a source checkout works without installing steel_fsd)

from steel_fsd.synthetic import generators as synthetic
from steel_fsd.utils.cli import UserError, check_output_dir, run_main
from steel_fsd.utils.io import write_json

FORMAT_VERSION = 1  # bump when the generator's output changes, so existing folders are rebuilt

README = """This is a SYNTHETIC dataset, not real steel images.

It was generated procedurally by steel_fsd.synthetic.{function} ({params}) with
tools/make_synthetic.py. Images and annotations follow the published {layout} layout exactly, so the
real loaders read them unchanged. The same parameters always give byte-identical files.

{description}
"""

NEU_DESCRIPTION = """Layout: IMAGES/<class>_<n>.jpg (200x200 JPEG, grayscale content in 3 identical channels) and
ANNOTATIONS/<class>_<n>.xml (Pascal VOC, 1-based inclusive boxes = tight boxes of the drawn defects).
Classes: crazing, inclusion, patches, pitted_surface, rolled-in_scale, scratches; 1-3 instances of the
named class per image, occasionally one of another class."""

SEVERSTAL_DESCRIPTION = """Layout: train_images/<ImageId>.jpg (1600x256 JPEG, grayscale content in 3 identical
channels) and train.csv (RLE masks: 1-based starts, column-major; one mask per class per image).
Classes: 1 clustered spots, 2 short vertical lines, 3 long horizontal bands / streaky areas,
4 large dark blotches; a fixed fraction of images is defect-free."""


def report_progress(done: int, total: int) -> None:
    """Print a line at every tenth of the images."""
    if done == total or done % max(1, total // 10) == 0:
        print(f"[make_synthetic]   {done}/{total} images", flush=True)


def build(folder: Path, params: dict, make: Callable[[Path], Path], readme: str) -> None:
    """Create ``folder`` with ``make`` unless it already holds a build with the same ``params``."""
    stamp = folder / "synthetic.json"
    record = {"format_version": FORMAT_VERSION, **params}
    if stamp.is_file():
        if json.loads(stamp.read_text()) == record:
            print(f"[make_synthetic] {folder}: up to date ({params}), skipping")
            return
        print(f"[make_synthetic] {folder}: parameters changed, regenerating")
        shutil.rmtree(folder)
    elif folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} exists but was not made by this tool (no synthetic.json)", "",
                        "refusing to overwrite it: choose another --out or move the folder away")
    print(f"[make_synthetic] writing {folder} ({params}) ...", flush=True)
    start = time.perf_counter()
    make(folder)
    (folder / "README.txt").write_text(readme)
    write_json(stamp, record, indent=2)
    print(f"[make_synthetic] {folder}: done in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="parent folder of neu-synth/ and severstal-synth/")
    parser.add_argument("--neu-per-class", type=int, default=50, help="NEU images per class (default 50)")
    parser.add_argument("--severstal-images", type=int, default=120, help="Severstal images (default 120)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("neu", "severstal"), help="write only this dataset")
    args = parser.parse_args(argv)
    if args.neu_per_class < 1 or args.severstal_images < 1:
        parser.error("--neu-per-class and --severstal-images must be at least 1 (use --only to make one set)")
    check_output_dir(str(args.out), "--out")

    if args.only in (None, "neu"):
        params = {"n_per_class": args.neu_per_class, "seed": args.seed}
        build(args.out / "neu-synth", params,
              lambda d: synthetic.make_neu_synthetic(d, **params, progress=report_progress),
              README.format(function="make_neu_synthetic", params=params, layout="NEU-DET",
                            description=NEU_DESCRIPTION))
    if args.only in (None, "severstal"):
        params = {"n_images": args.severstal_images, "seed": args.seed, "negative_fraction": 0.2, "header": "v1"}
        build(args.out / "severstal-synth", params,
              lambda d: synthetic.make_severstal_synthetic(d, **params, progress=report_progress),
              README.format(function="make_severstal_synthetic", params=params, layout="Severstal (Kaggle)",
                            description=SEVERSTAL_DESCRIPTION))


if __name__ == "__main__":
    sys.exit(run_main(main))
