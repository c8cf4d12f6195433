"""Can the support set raise the foreground probability of new classes? A probe of the prototype swap.

    python benchmarks/probe_support_fg.py --protocol-out output/fewshot_neu_real --shots 10 --seeds 0 1 2

Issue 12's diagnosis found most novel boxes scored as background under the swap: the background logit was
learned on base classes only. With factorized logits, p(c) = p(fg) * q_c, adding an offset b_c to class c's
column raises p(c) against the background for ROIs that look like c. Here b_c is set from the support boxes
themselves: b_c = max(0, median over the K support boxes of c of (background logit - log q_c)), the offset at
which half of them would be called c rather than background (base classes get about 0). The probe evaluates the
swap with and without the offsets on ``neu_val`` (never the test split) for each K-shot cell of a finished
protocol run (rotation 1: novel = inclusion, patches), and writes
``benchmarks/results/probe_support_fg.json``. The offsets are a probe, not a shipped method.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import REPO, save

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from steel_fsd.data import register_all  # noqa: E402
from steel_fsd.data.mapper import SteelDatasetMapper  # noqa: E402
from steel_fsd.fewshot.support import load_manifest, manifest_support_dicts, sample_support  # noqa: E402
from steel_fsd.fewshot.adapt import embed_instances  # noqa: E402
from steel_fsd.engine.setup import build_config, finalize_config  # noqa: E402
from steel_fsd.engine.loading import load_model_for_eval  # noqa: E402
from steel_fsd.engine.trainer import evaluate  # noqa: E402
from steel_fsd.modeling.cosine_head import cosine_scores  # noqa: E402

SETTING = "base_novel_neu_novel-inclusion+patches"
NOVEL = ("inclusion", "patches")
CONFIG = "configs/prototype/proto_R18_FPN_GN_neu_cpu.yaml"


def support_offsets(model, cfg, manifest: dict, names: list[str], shots: int, seed: int) -> torch.Tensor:
    """b_c = max(0, median_i(bg_i - log q_c(z_i))) over the support boxes i of each class c."""
    rh, pred = model.roi_heads, model.roi_heads.box_predictor

    def embed_and_bg(features, boxes):
        x = rh.box_head(rh.box_pooler([features[f] for f in rh.box_in_features], boxes)).flatten(1)
        return torch.cat([pred.embed_features(x), pred.bg_score(x)], 1)

    picks = sample_support(manifest_support_dicts(manifest, DatasetCatalog.get("neu_train")), len(names), shots, seed)
    zb = embed_instances(model, picks, SteelDatasetMapper(cfg, is_train=False), embed=embed_and_bg)
    labels = torch.tensor([d["annotations"][i]["category_id"] for d, i in picks])
    with torch.no_grad():
        logq = F.log_softmax(cosine_scores(zb[:, :-1], pred.active_prototypes(), pred.tau), 1)
    need = [(zb[labels == c, -1] - logq[labels == c, c]).median() for c in range(len(names))]
    return torch.stack(need).clamp(min=0)


def rotation1_probe_args(description: str, add_arguments=None):
    """Parse a probe's arguments over a finished rotation-1 protocol run and register the datasets. Returns
    (args, run folder, the prototype base model's weights, class names)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--protocol-out", default="output/fewshot_neu_real", help="a run of neu_real_cpu.yaml")
    ap.add_argument("--shots", type=int, nargs="+", default=[10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    if add_arguments:
        add_arguments(ap)
    args = ap.parse_args()
    register_all(args.data)
    out = Path(args.protocol_out)
    weights = sorted((out / "models").glob("prototype_neu_base-*/model_final.pth"))
    if len(weights) != 1:
        sys.exit(f"expected one prototype base model under {out}/models, found {len(weights)}")
    return args, out, weights, list(MetadataCatalog.get("neu_train").thing_classes)


def novel_base_ap50(ap50: dict[str, float]) -> dict:
    """nAP50 and bAP50 (means over the novel / base classes of rotation 1) of per-class AP50."""
    base = [v for n, v in ap50.items() if n not in NOVEL]
    return {"nAP50": sum(ap50[n] for n in NOVEL) / len(NOVEL), "bAP50": sum(base) / len(base)}


def main() -> None:
    args, out, weights, names = rotation1_probe_args(__doc__.splitlines()[0])
    rows = []
    for k in args.shots:
        for seed in args.seeds:
            protos = out / "cells" / SETTING / "prototype" / f"K{k}_seed{seed}" / "prototypes.pt"
            cfg = build_config(str(REPO / CONFIG), ["MODEL.WEIGHTS", str(weights[0]), "MODEL.PROTOTYPE.SUPPORT_FILE",
                                                    str(protos), "DATASETS.TEST", "('neu_val',)",
                                                    "OUTPUT_DIR", str(REPO / "output" / "probe_support_fg")])
            finalize_config(cfg, datasets=(), weights=str(weights[0]), swap=True)
            model = load_model_for_eval(cfg)
            offsets = support_offsets(model, cfg, load_manifest(out / "manifests" / f"neu_train_{k}shot_seed{seed}.json"),
                                      names, k, seed)
            pred, plain = model.roi_heads.box_predictor, model.roi_heads.box_predictor.logits
            for variant in ("swap", "swap+support offsets"):
                def logits(z, bg, fg, available=None, on=variant != "swap"):
                    out_ = plain(z, bg, fg, available)
                    return torch.cat([out_[:, :-1] + offsets.to(out_), out_[:, -1:]], 1) if on else out_
                pred.logits = logits
                res = evaluate(cfg, model)["neu_val"]["bbox"]
                ap50 = {n: res[f"AP50-{n}"] for n in names}
                rows.append({"K": k, "seed": seed, "variant": variant, "offsets": dict(zip(names, offsets.tolist())),
                             **novel_base_ap50(ap50), "AP50_per_class": ap50})
                print(rows[-1], flush=True)
            pred.logits = plain
    save("probe_support_fg", {"protocol_out": str(out), "split": "neu_val", "base_model": str(weights[0]),
                              "rows": rows})


if __name__ == "__main__":
    main()
