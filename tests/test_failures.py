"""Novel-class failure analysis: per-box outcomes by hand, the per-class table, and a model run end to end."""
from pathlib import Path

import pytest
import torch

from steel_fsd.evaluation.failures import OUTCOMES, failure_table, gt_outcomes

REPO = Path(__file__).resolve().parents[1]


def test_gt_outcomes_by_hand():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [70, 70, 80, 80], [0, 50, 10, 60]])
    gt_cls = torch.tensor([3, 3, 0, 3, 1])  # 3 is novel, 0 and 1 base
    # proposals by objectness: the 2nd box only from rank 2 on, the 4th never, the 5th at rank 0
    props = torch.tensor([[0.0, 50, 10, 60], [0, 0, 10, 10], [21, 21, 40, 40], [50, 50, 60, 60]])
    det = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 40, 41], [50, 50, 60, 60], [0, 50, 10, 60],
                        [70, 70, 80, 80]])
    det_cls = torch.tensor([0, 3, 3, 2, 1, 3])
    det_scores = torch.tensor([0.9, 0.5, 0.4, 0.8, 0.7, 0.01])  # the last is under the score threshold
    recs = gt_outcomes(gt, gt_cls, props, det, det_cls, det_scores, {2, 3}, ks=(1, 3))
    assert [r["proposed@1"] for r in recs] == [False, False, False, False, True]
    assert [r["proposed@3"] for r in recs] == [True, True, False, False, True]
    assert [r["outcome"] for r in recs] == ["base_class", "correct", "other_novel", "background", "correct"]
    assert recs[0]["confused_with"] == 0 and recs[0]["score"] == pytest.approx(0.9)  # the top detection decides
    assert recs[2]["confused_with"] == 2 and recs[3]["score"] is None
    table = failure_table(recs, ["a", "b", "c", "d"], {2, 3}, ks=(1, 3))
    assert [r["class"] for r in table] == ["d", "a", "b"]  # novel first, classes without boxes left out
    d = table[0]
    assert d["gt"] == 3 and d["RPN recall@3"] == pytest.approx(200 / 3) and d["RPN recall@1"] == 0
    assert (d["correct"], d["background"], d["base_class"]) == pytest.approx((100 / 3, 100 / 3, 100 / 3))
    assert d["most_confused_with"] == "a"
    assert table[1]["other_novel"] == 100 and sum(table[1][o] for o in OUTCOMES) == pytest.approx(100)


def test_no_proposals_or_detections():
    recs = gt_outcomes(torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([1]), torch.zeros(0, 4), torch.zeros(0, 4),
                       torch.zeros(0, dtype=torch.long), torch.zeros(0), {1})
    assert recs == [{"class": 1, "proposed@100": False, "proposed@300": False, "outcome": "background",
                     "confused_with": None, "score": None}]


def test_diagnose_runs_a_model_over_a_dataset(tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from steel_fsd.data import register_neu
    from steel_fsd.inference.diagnose import diagnose
    from steel_fsd.engine.setup import build_config
    from steel_fsd.synthetic import make_neu_synthetic

    root = make_neu_synthetic(tmp_path / "neu", n_per_class=1, seed=2)
    if "t_diag" not in DatasetCatalog.list():
        register_neu("t_diag", root, split="train")
    cfg = build_config(str(REPO / "configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml"),
                       ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "INPUT.HARMONIZE.RESIZE", "96"])
    torch.manual_seed(0)
    table, records = diagnose(build_model(cfg), cfg, "t_diag", ["inclusion", "scratches"])
    n_gt = sum(len(d["annotations"]) for d in DatasetCatalog.get("t_diag"))
    assert len(records) == n_gt and sum(r["gt"] for r in table) == n_gt
    for r in table:
        assert r["RPN recall@100"] <= r["RPN recall@300"] and sum(r[o] for o in OUTCOMES) == pytest.approx(100)
    assert [r["novel"] for r in table][:2] == [True, True]
    with pytest.raises(ValueError, match="not classes"):
        diagnose(build_model(cfg), cfg, "t_diag", ["no_such"])
