"""Tests for steel_fsd.evaluation.prf: matching vs a brute-force reference, metrics, evaluator."""
from __future__ import annotations

import json
import math
import os
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils import comm

from steel_fsd.engine.launch import launch
from steel_fsd.evaluation.prf import (SWEEP_THRESHOLDS, PRFEvaluator, build_prf_evaluator, f1_at_chosen_threshold,
                                     match_detections, prf_from_counts, sweep_key)

NAN = math.nan


# ----------------------------------------------------------------------------- brute-force reference
def ref_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if inter > 0 else 0.0


def ref_match(gts, dets, thr, num_classes):
    """gts: [(box, cls, crowd)], dets: [(box, score, cls)] -> (tp, fp, n_gt, n_ignored) lists."""
    tp, fp, n_gt = [0] * num_classes, [0] * num_classes, [0] * num_classes
    ignored = 0
    for _, c, crowd in gts:
        if not crowd:
            n_gt[c] += 1
    used = [False] * len(gts)
    order = sorted(range(len(dets)), key=lambda i: -dets[i][1])  # Python's sort is stable
    for i in order:
        box, _, c = dets[i]
        best, best_iou = None, -1.0
        for j, (gbox, gc, crowd) in enumerate(gts):
            if gc == c and not crowd and not used[j]:
                v = ref_iou(box, gbox)
                if v >= thr and v > best_iou:
                    best, best_iou = j, v
        if best is not None:
            used[best] = True
            tp[c] += 1
        elif any(gc == c and crowd and ref_iou(box, gbox) >= thr for gbox, gc, crowd in gts):
            ignored += 1
        else:
            fp[c] += 1
    return tp, fp, n_gt, ignored


def random_box(rng: np.random.Generator) -> list[float]:
    # Integer grid: IoUs are exact small rationals, so float32 (ours) and float64 (reference)
    # agree on every comparison with the threshold and between candidates (exact ties included).
    x0, y0 = (int(v) for v in rng.integers(0, 10, size=2))
    w, h = (int(v) for v in rng.integers(1, 7, size=2))
    return [float(x0), float(y0), float(x0 + w), float(y0 + h)]


def random_case(rng: np.random.Generator, num_classes: int):
    gts = [(random_box(rng), int(rng.integers(num_classes)), bool(rng.random() < 0.2))
           for _ in range(int(rng.integers(0, 8)))]
    dets = [(random_box(rng), float(rng.choice([0.2, 0.5, 0.9])), int(rng.integers(num_classes)))
            for _ in range(int(rng.integers(0, 12)))]
    # Half the detections are jittered copies of ground truth, so that matches are frequent.
    for k in range(len(dets)):
        if gts and rng.random() < 0.5:
            gbox, gc, _ = gts[int(rng.integers(len(gts)))]
            jit = [v + float(rng.integers(-1, 2)) for v in gbox]
            jit[2], jit[3] = max(jit[2], jit[0] + 1), max(jit[3], jit[1] + 1)
            dets[k] = (jit, dets[k][1], gc if rng.random() < 0.8 else dets[k][2])
    return gts, dets


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_match_detections_matches_brute_force(thr):
    num_classes = 3
    totals = np.zeros(4, dtype=np.int64)  # tp, fp, fn, ignored: make sure every path was exercised
    for seed in range(300):
        rng = np.random.default_rng(seed)
        gts, dets = random_case(rng, num_classes)
        tp_ref, fp_ref, ngt_ref, ign = ref_match(gts, dets, thr, num_classes)
        gt_boxes = np.array([g[0] for g in gts], dtype=np.float32).reshape(-1, 4)
        det_boxes = np.array([d[0] for d in dets], dtype=np.float32).reshape(-1, 4)
        as_input = [lambda x: x, torch.as_tensor, lambda x: Boxes(torch.as_tensor(x))][seed % 3]
        tp, fp, n_gt = match_detections(
            as_input(gt_boxes), [g[1] for g in gts], as_input(det_boxes),
            torch.tensor([d[1] for d in dets]), torch.tensor([d[2] for d in dets], dtype=torch.int64),
            thr, num_classes=num_classes, gt_iscrowd=[int(g[2]) for g in gts])
        assert tp.tolist() == tp_ref, seed
        assert fp.tolist() == fp_ref, seed
        assert n_gt.tolist() == ngt_ref, seed
        assert tp.sum() + fp.sum() + ign == len(dets)
        totals += [tp.sum(), fp.sum(), (n_gt - tp).sum(), ign]
    assert (totals > 0).all(), totals


def test_duplicate_detection_is_one_tp_one_fp():
    tp, fp, n_gt = match_detections([[0, 0, 10, 10]], [0], [[0, 0, 10, 10], [1, 1, 10, 10]],
                                    [0.6, 0.9], [0, 0], 0.5)
    assert (tp.tolist(), fp.tolist(), n_gt.tolist()) == ([1], [1], [1])


def test_wrong_class_is_fp_and_fn():
    tp, fp, n_gt = match_detections([[0, 0, 10, 10]], [1], [[0, 0, 10, 10]], [0.9], [0], 0.5)
    assert tp.tolist() == [0, 0] and fp.tolist() == [1, 0] and n_gt.tolist() == [0, 1]


def test_greedy_by_score_not_optimal_assignment():
    # d0 (higher score) takes g0, its best match, leaving d1 (which only overlaps g0) an FP,
    # although the assignment d0->g1, d1->g0 would give 2 TP.
    gts = [[0, 0, 10, 10], [2, 0, 12, 10]]
    dets = [[1, 0, 11, 10], [0, 0, 9, 10]]
    assert ref_iou(dets[0], gts[0]) == ref_iou(dets[0], gts[1])  # tie: the lower gt index wins
    assert ref_iou(dets[1], gts[1]) < 0.7 <= ref_iou(dets[1], gts[0])
    tp, fp, _ = match_detections(gts, [0, 0], dets, [0.9, 0.8], [0, 0], 0.7)
    assert (tp[0], fp[0]) == (1, 1)
    tp, fp, _ = match_detections(gts, [0, 0], dets, [0.8, 0.9], [0, 0], 0.7)  # d1 first: 2 TP
    assert (tp[0], fp[0]) == (2, 0)


def test_equal_scores_visit_in_index_order():
    # Same geometry as above, equal scores: whichever detection comes first in index order wins.
    gts = [[0, 0, 10, 10], [2, 0, 12, 10]]
    d_both, d_only_g0 = [1, 0, 11, 10], [0, 0, 9, 10]
    tp, fp, _ = match_detections(gts, [0, 0], [d_both, d_only_g0], [0.5, 0.5], [0, 0], 0.7)
    assert (tp[0], fp[0]) == (1, 1)
    tp, fp, _ = match_detections(gts, [0, 0], [d_only_g0, d_both], [0.5, 0.5], [0, 0], 0.7)
    assert (tp[0], fp[0]) == (2, 0)


def test_crowd_gt_is_ignored_not_counted():
    gts, classes, crowd = [[0, 0, 10, 10], [50, 50, 90, 90]], [0, 0], [0, 1]
    dets = [[50, 50, 90, 90], [51, 51, 90, 90], [0, 0, 10, 10], [200, 200, 210, 210]]
    tp, fp, n_gt = match_detections(gts, classes, dets, [0.9, 0.8, 0.7, 0.6], [0] * 4, 0.5,
                                    gt_iscrowd=crowd)
    assert (tp[0], fp[0], n_gt[0]) == (1, 1, 1)  # two dets absorbed by the crowd box
    # A regular gt is preferred over a crowd one; a crowd box of another class does not absorb.
    tp, fp, n_gt = match_detections([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], [0, 0, 1],
                                    [[0, 0, 10, 10]] * 2, [0.9, 0.8], [0, 1], 0.5,
                                    gt_iscrowd=[1, 0, 1])
    assert tp.tolist() == [1, 0] and fp.tolist() == [0, 0] and n_gt.tolist() == [1, 0]


def test_empty_inputs_and_validation():
    tp, fp, n_gt = match_detections(np.zeros((0, 4)), [], np.zeros((0, 4)), [], [], 0.5, num_classes=2)
    assert tp.tolist() == fp.tolist() == n_gt.tolist() == [0, 0]
    tp, fp, n_gt = match_detections(np.zeros((0, 4)), [], [[0, 0, 1, 1]], [0.9], [1], 0.5)
    assert fp.tolist() == [0, 1] and n_gt.tolist() == [0, 0]
    with pytest.raises(ValueError):
        match_detections([[0, 0, 1, 1]], [2], [], [], [], 0.5, num_classes=2)
    with pytest.raises(ValueError):
        match_detections([[0, 0, 1, 1]], [0, 1], [], [], [], 0.5)


@pytest.mark.parametrize("tp,fp,n_gt", [(t, f, g) for g in range(4) for t in range(g + 1) for f in range(3)])
def test_prf_from_counts_definitions(tp, fp, n_gt):
    p, r, f1 = prf_from_counts(tp, fp, n_gt)
    if n_gt == 0 and fp == 0:
        assert math.isnan(p) and math.isnan(r) and math.isnan(f1)
        return
    assert p == (tp / (tp + fp) if tp + fp else 0.0)
    if n_gt == 0:
        assert math.isnan(r) and p == 0.0 and f1 == 0.0
        return
    assert r == tp / n_gt
    assert f1 == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)


# ----------------------------------------------------------------------------- evaluator
CLASSES = ["scratch", "inclusion", "patch", "pitted"]


def toy_dicts() -> list[dict]:
    ann = lambda box, c, mode=BoxMode.XYXY_ABS, crowd=0: dict(bbox=box, bbox_mode=mode, category_id=c,
                                                                iscrowd=crowd)
    return [
        dict(file_name="a.png", image_id="a", height=200, width=200, annotations=[
            ann([0, 0, 10, 10], 0),
            ann([20, 20, 10, 10], 0, BoxMode.XYWH_ABS),  # = [20, 20, 30, 30]
            ann([50, 50, 60, 60], 1),
            ann([100, 100, 150, 150], 0, crowd=1),
        ]),
        dict(file_name="b.png", image_id="b", height=200, width=200,
             annotations=[ann([0, 0, 20, 20], 1)]),
        dict(file_name="c.png", image_id="c", height=200, width=200, annotations=[]),
    ]


def toy_outputs() -> dict[str, list[tuple[list[float], float, int]]]:
    """Per image: (box, score, class). Expected outcome in the comments."""
    return {
        "a": [([0, 0, 10, 10], 0.9, 0),        # scratch TP
              ([1, 1, 10, 10], 0.8, 0),        # scratch duplicate (IoU 0.81): FP
              ([20, 20, 30, 30], 0.3, 0),      # below score threshold: ignored -> scratch #2 is FN
              ([50, 50, 60, 60], 0.7, 2),      # wrong class: patch FP, inclusion FN
              ([100, 100, 150, 150], 0.95, 0)],  # on the crowd box: ignored
        "b": [([0, 0, 20, 18], 0.5, 1)],       # inclusion TP (IoU 0.9, score == threshold)
        "c": [([5, 5, 6, 6], 0.49, 3)],        # below threshold
    }


def make_output(dets: list[tuple[list[float], float, int]]) -> dict:
    inst = Instances((200, 200))
    inst.pred_boxes = Boxes(torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([d[1] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([d[2] for d in dets], dtype=torch.int64)
    return {"instances": inst}


def register_toy() -> str:
    name = f"prf_toy_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, toy_dicts)
    MetadataCatalog.get(name).set(thing_classes=CLASSES)
    return name


@pytest.fixture
def toy_name():
    name = register_toy()
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def run_evaluator(evaluator: PRFEvaluator, image_ids: list[str]) -> dict:
    outs = toy_outputs()
    evaluator.reset()
    for iid in image_ids:  # batches of one, and one batch of the rest
        evaluator.process([{"image_id": iid}], [make_output(outs[iid])])
    return evaluator.evaluate()


def check_toy_results(res: dict) -> None:
    # Hand counts: scratch gt 2 TP 1 FP 1; inclusion gt 2 TP 1 FP 0; patch gt 0 FP 1; pitted nothing.
    assert (res["TP"], res["FP"], res["FN"]) == (2, 2, 2)
    assert res["P-scratch"] == pytest.approx(50) and res["R-scratch"] == pytest.approx(50)
    assert res["F1-scratch"] == pytest.approx(50)
    assert res["P-inclusion"] == pytest.approx(100) and res["R-inclusion"] == pytest.approx(50)
    assert res["F1-inclusion"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
    assert res["P-patch"] == 0 and math.isnan(res["R-patch"]) and res["F1-patch"] == 0
    assert all(math.isnan(res[f"{k}-pitted"]) for k in ("P", "R", "F1"))
    # Macro: over scratch and inclusion only.
    assert res["precision"] == pytest.approx(75) and res["recall"] == pytest.approx(50)
    assert res["f1"] == pytest.approx((50 + 100 * 2 / 3) / 2)
    assert res["precision_micro"] == pytest.approx(50) and res["recall_micro"] == pytest.approx(50)
    assert res["f1_micro"] == pytest.approx(50)


def test_evaluator_end_to_end(toy_name, tmp_path):
    ev = PRFEvaluator(toy_name, score_thresh=0.5, iou_thresh=0.5, distributed=False,
                      output_dir=str(tmp_path))
    res = run_evaluator(ev, ["a", "b", "c"])
    assert set(res) == {"prf"}
    check_toy_results(res["prf"])
    saved = json.loads((tmp_path / "prf_results.json").read_text())
    assert saved["P-pitted"] is None and saved["precision"] == pytest.approx(75)
    # Re-running after reset gives the same numbers (no leftover counts).
    check_toy_results(run_evaluator(ev, ["c", "b", "a"])["prf"])


def test_evaluator_thresholds_change_counts(toy_name):
    # Score >= 0.25 admits the 0.3 detection (scratch #2 now TP) and the 0.49 one (pitted FP);
    # at IoU 0.85 the duplicate (IoU 0.81) stays an FP and "b" (IoU 0.9) stays a TP.
    res = run_evaluator(PRFEvaluator(toy_name, 0.25, 0.85, distributed=False), ["a", "b", "c"])["prf"]
    assert (res["TP"], res["FP"], res["FN"]) == (3, 3, 1)
    assert res["P-pitted"] == 0 and res["R-scratch"] == pytest.approx(100)
    res = run_evaluator(PRFEvaluator(toy_name, 0.5, 0.95, distributed=False), ["a", "b", "c"])["prf"]
    assert (res["TP"], res["FP"], res["FN"]) == (1, 3, 3)  # "b" det (IoU 0.9) now FP, its gt FN


def test_f1_sweep_equals_an_evaluator_at_each_threshold(toy_name):
    """The sweep's macro F1 at each threshold is what an evaluator built with that threshold reports; the best
    is the first maximum; at 0.25 the toy's hand counts give scratch F1 80 and inclusion F1 66.7."""
    res = run_evaluator(PRFEvaluator(toy_name, 0.5, 0.5, distributed=False), ["a", "b", "c"])["prf"]
    sweep = []
    for t in SWEEP_THRESHOLDS:
        ref = run_evaluator(PRFEvaluator(toy_name, t, 0.5, distributed=False), ["a", "b", "c"])["prf"]["f1"]
        assert res[sweep_key(t)] == pytest.approx(ref, nan_ok=True), t
        sweep.append(ref)
    assert res[sweep_key(0.25)] == pytest.approx((100 * 2 * 2 / (2 * 2 + 1 + 0) + 100 * 2 / 3) / 2)
    assert len(set(sweep)) > 1  # the toy's scores (0.3, 0.49, 0.6, ...) move F1 along the sweep
    assert res["f1_best"] == pytest.approx(max(sweep)) and res["thresh_best"] == SWEEP_THRESHOLDS[sweep.index(max(sweep))]


def test_f1_at_a_threshold_chosen_on_another_split():
    val = {sweep_key(t): v for t, v in zip(SWEEP_THRESHOLDS, [10, 20, 50, 50] + [5] * 15)}
    test = {sweep_key(t): 100 * t for t in SWEEP_THRESHOLDS}
    assert f1_at_chosen_threshold(val, test) == (0.15, pytest.approx(15.0))  # ties: the lower threshold
    nan_val = dict(val, **{sweep_key(0.15): math.nan})
    assert f1_at_chosen_threshold(nan_val, test)[0] == 0.20
    with pytest.raises(KeyError, match="without an F1 sweep"):
        f1_at_chosen_threshold({"f1": 50.0}, test)


def test_evaluator_from_cfg_and_errors(toy_name):
    from detectron2.config import get_cfg

    from steel_fsd.config import add_steel_fsd_config

    cfg = add_steel_fsd_config(get_cfg())
    cfg.TEST.PRF_SCORE_THRESH = 0.25
    ev = build_prf_evaluator(cfg, toy_name, distributed=False)
    assert run_evaluator(ev, ["c"])["prf"]["FP"] == 1
    with pytest.raises(KeyError):
        ev.process([{"image_id": "nope"}], [make_output([])])
    assert PRFEvaluator(toy_name, distributed=False).evaluate() == {}  # nothing processed


def test_evaluator_gathers_counts_across_ranks(toy_name, monkeypatch):
    ev0, ev1 = (PRFEvaluator(toy_name, distributed=True) for _ in range(2))
    outs = toy_outputs()
    ev0.process([{"image_id": "a"}], [make_output(outs["a"])])
    ev1.process([{"image_id": "b"}, {"image_id": "c"}], [make_output(outs["b"]), make_output(outs["c"])])
    sent = []

    def fake_gather(data, dst=0, group=None):
        sent.append(data)
        return [data, (ev1._counts, ev1._num_images, ev1._sweep)] if comm.is_main_process() else []

    monkeypatch.setattr(comm, "gather", fake_gather)
    res = ev0.evaluate()["prf"]
    check_toy_results(res)
    one = run_evaluator(PRFEvaluator(toy_name, distributed=False), ["a", "b", "c"])["prf"]
    assert all(res[sweep_key(t)] == pytest.approx(one[sweep_key(t)], nan_ok=True) for t in SWEEP_THRESHOLDS)
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    assert ev1.evaluate() == {} and len(sent) == 2


def _dist_main(out_dir: str) -> None:
    rank = comm.get_rank()
    name = register_toy()
    ev = PRFEvaluator(name, distributed=True, output_dir=out_dir)
    res = run_evaluator(ev, [["a"], ["b", "c"]][rank])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or torch.cuda.is_available(),
                    reason="the CPU (gloo) path of steel_fsd.engine.launch")
def test_evaluator_real_gloo_two_processes(tmp_path):
    # through the package's launcher, which owns process-group set-up and a teardown that cannot abort
    launch(_dist_main, 2, dist_url="auto", args=(str(tmp_path),))
    res0 = json.loads((tmp_path / "rank0.json").read_text())
    res1 = json.loads((tmp_path / "rank1.json").read_text())
    assert res1 == {}
    check_toy_results(res0["prf"])


def test_evaluators_follow_the_datasets_evaluator_type(tmp_path):
    """COCO + P/R/F1 for "coco" datasets (and those registered without a type); other types are refused by name."""
    from detectron2.evaluation import COCOEvaluator

    from steel_fsd.engine.setup import build_config
    from steel_fsd.engine.trainer import build_evaluator
    from steel_fsd.evaluation.prf import PRFEvaluator
    from steel_fsd.utils.cli import UserError

    cfg = build_config("configs/demo/faster_rcnn_R18_FPN_synth_neu.yaml", ["OUTPUT_DIR", str(tmp_path)])
    names = {kind: f"t_evaltype_{kind}_{uuid.uuid4().hex[:6]}" for kind in ("coco", "none", "sem_seg")}
    for kind, name in names.items():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=["a"], **({} if kind == "none" else {"evaluator_type": kind}))
    for kind in ("coco", "none"):
        evs = build_evaluator(cfg, names[kind])._evaluators
        assert [type(e) for e in evs][1] is PRFEvaluator and isinstance(evs[0], COCOEvaluator)
    with pytest.raises(UserError, match="evaluator_type 'sem_seg'"):
        build_evaluator(cfg, names["sem_seg"])
