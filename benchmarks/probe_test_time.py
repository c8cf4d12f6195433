"""Test-time settings of the prototype swap on novel classes, probed on ``neu_val`` (never the test split).

    python benchmarks/probe_test_time.py --protocol-out output/fewshot_neu_real --shots 10 --seeds 0 1 2

Issue 12's diagnosis found most novel boxes scored low: under the swap, p(novel class) of a novel box is often
below the detector's score threshold (0.05), so the box never enters the ranking that AP is computed from. This
probe re-evaluates finished prototype-swap cells of rotation 1 (novel = inclusion, patches) with the same
prototypes and different test-time settings (score threshold, detections per image, RPN proposals), and writes
``benchmarks/results/probe_test_time.json`` (nAP50 / bAP50 per cell and variant). A probe, not a method.
"""
from __future__ import annotations

from common import REPO, save
from probe_support_fg import CONFIG, SETTING, novel_base_ap50, rotation1_probe_args

from steel_fsd.fewshot.adapt import evaluate_with_support  # noqa: E402
from steel_fsd.engine.setup import build_config, finalize_config  # noqa: E402

VARIANTS = {  # name: test-time overrides (the shipped CPU config: score >= 0.05, 50 per image, 300 proposals)
    "shipped": [],
    "score0.001": ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.001"],
    "score0.001_det100": ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.001", "TEST.DETECTIONS_PER_IMAGE", "100"],
    "score0.001_det100_prop1000": ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.001", "TEST.DETECTIONS_PER_IMAGE", "100",
                                   "MODEL.RPN.PRE_NMS_TOPK_TEST", "1000", "MODEL.RPN.POST_NMS_TOPK_TEST", "1000"],
}


def main() -> None:
    args, out, weights, names = rotation1_probe_args(
        __doc__.splitlines()[0], lambda ap: ap.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                                                            default=list(VARIANTS)))
    rows = []
    for k in args.shots:
        for seed in args.seeds:
            protos = out / "cells" / SETTING / "prototype" / f"K{k}_seed{seed}" / "prototypes.pt"
            for variant in args.variants:
                cfg = build_config(str(REPO / CONFIG), ["DATASETS.TEST", "('neu_val',)", "OUTPUT_DIR",
                                                        str(REPO / "output" / "probe_test_time"), *VARIANTS[variant]])
                finalize_config(cfg, datasets=(), weights=str(weights[0]), swap=True)
                res = evaluate_with_support(cfg, str(weights[0]), str(protos), ["neu_val"])["neu_val"]["bbox"]
                ap50 = {n: res[f"AP50-{n}"] for n in names}
                rows.append({"K": k, "seed": seed, "variant": variant, "opts": VARIANTS[variant],
                             **novel_base_ap50(ap50), "AP50_per_class": ap50})
                print({k_: v for k_, v in rows[-1].items() if k_ != "AP50_per_class"}, flush=True)
    save("probe_test_time", {"protocol_out": str(out), "split": "neu_val", "base_model": str(weights[0]),
                             "rows": rows})


if __name__ == "__main__":
    main()
