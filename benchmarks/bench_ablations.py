"""The ablation table in one command: full prototype model, A no multi-scale fusion, B no triplet loss,
C softmax classifier; same schedule (CPU demo size, synthetic NEU), each trained (resuming) then evaluated."""
from __future__ import annotations

from common import save, synthetic_datasets, train_and_evaluate

ROWS = {"full": "configs/ablations/full.yaml", "A: no multi-scale fusion": "configs/ablations/A_single_level.yaml",
        "B: no triplet loss": "configs/ablations/B_no_triplet.yaml", "C: softmax classifier": "configs/ablations/C_softmax.yaml"}


def main() -> None:
    synthetic_datasets()
    table = {row: train_and_evaluate(cfg, [])[0] for row, cfg in ROWS.items()}
    from tabulate import tabulate

    metrics = ("AP", "AP50", "AP75", "P", "R", "F1")
    print(tabulate([[row] + [r["mean"][k] for k in metrics] for row, r in table.items()], headers=["row", *metrics],
                   floatfmt=".1f", tablefmt="github"))
    save("ablations", {"rows": table})


if __name__ == "__main__":
    main()
