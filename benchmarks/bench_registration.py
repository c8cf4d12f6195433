"""Registration speed at full dataset size: Severstal CSV (12,568 images / ~7,000 RLE masks) and
NEU-format 1,800 VOC XML. Targets: < 10 s and < 2 s. Reported as measured / target ratios."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import save

from steel_fsd.data.neu import load_neu_voc
from steel_fsd.data.severstal import load_severstal
from steel_fsd.synthetic import make_neu_synthetic, make_severstal_csv_only


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Best of ``repeats`` wall times (the first run included: files are in the page cache anyway)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sev = Path(tmp) / "severstal"
        make_severstal_csv_only(sev / "train.csv", n_images=12568, n_masks=7095, seed=0, image_dir=sev / "train_images")
        t_sev, dicts = timed(lambda: load_severstal(sev), repeats=2)
        n_boxes = sum(len(d["annotations"]) for d in dicts)
        neu = make_neu_synthetic(Path(tmp) / "neu", n_per_class=300, seed=0)
        t_neu, neu_dicts = timed(lambda: load_neu_voc(neu))
    save("registration", {
        "severstal": {"images": len(dicts), "boxes": n_boxes, "seconds": round(t_sev, 2), "target_s": 10,
                      "ratio_to_target": round(t_sev / 10, 3)},
        "neu": {"xml_files": len(neu_dicts), "seconds": round(t_neu, 3), "target_s": 2,
                "ratio_to_target": round(t_neu / 2, 3)},
    })


if __name__ == "__main__":
    main()
