"""Image-level accept/reject: thresholds at a false-alarm rate against brute force, ROC, the evaluator."""
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances

from steel_fsd.evaluation.image_level import (ImageLevelEvaluator, rates_at, roc_auc, roc_points, summarize,
                                              threshold_for_false_alarm)


def brute_force_threshold(good, rate):
    """The smallest candidate threshold (each score, just above it, or 0) keeping false alarms <= rate * n."""
    candidates = sorted({0.0, *good, *(np.nextafter(g, np.inf) for g in good)})
    ok = [t for t in candidates if np.sum(np.asarray(good) >= t) <= math.floor(rate * len(good) + 1e-9)]
    return min(ok)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.2, 1.0])
def test_threshold_for_false_alarm_equals_brute_force(seed, rate):
    rng = np.random.default_rng(seed)
    good = np.round(rng.random(int(rng.integers(1, 120))), 2)  # ties included
    t = threshold_for_false_alarm(good, rate)
    assert t == brute_force_threshold(good, rate)
    assert np.sum(good >= t) <= math.floor(rate * len(good) + 1e-9)


def test_requested_false_alarm_rate_is_met_to_within_one_image():
    rng = np.random.default_rng(0)
    good, bad = rng.beta(2, 5, 400), rng.beta(5, 2, 300)
    for rate in (0.01, 0.05, 0.1):
        fa, rec = rates_at(good, bad, threshold_for_false_alarm(good, rate))
        assert rate - 1 / len(good) < fa <= rate and 0 < rec <= 1


def test_roc_and_summary():
    good, bad = [0.1, 0.2, 0.3, 0.9], [0.5, 0.95, 0.99]
    roc = roc_points(good, bad)
    assert (roc["false_alarm"][0], roc["recall"][0]) == (0.0, 0.0) and roc["threshold"][0] is None
    assert (roc["false_alarm"][-1], roc["recall"][-1]) == (1.0, 1.0)
    pairs = sum(g < b for g in good for b in bad) / (len(good) * len(bad))  # AUC = P(defect score > good score)
    assert roc_auc(roc) == pytest.approx(pairs)
    s = summarize(good, bad, rates=(0.0, 0.25))
    assert s["recall@FA0%"] == pytest.approx(200 / 3) and s["false_alarm@FA0%"] == 0  # t just above 0.9
    assert s["recall@FA25%"] == pytest.approx(100) and s["false_alarm@FA25%"] == 25
    assert math.isnan(summarize([], bad)["recall@FA1%"]) and summarize([], bad)["defect_images"] == 3


def test_evaluator_reads_defect_free_images_from_the_dataset(tmp_path):
    name = "t_image_level"
    dicts = [{"image_id": i, "annotations": [{"bbox": [0, 0, 1, 1]}] if i % 2 else []} for i in range(20)]
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: dicts)
    ev = ImageLevelEvaluator(name, distributed=False, output_dir=str(tmp_path))
    ev.reset()
    scores = {i: (0.5 + i / 100 if i % 2 else i / 100) for i in range(20)}  # defects all above good images
    for i in range(20):
        n = 0 if i == 2 else 1  # image 2: no detection at all -> score 0
        inst = Instances((8, 8), pred_boxes=Boxes(torch.zeros(n, 4)), scores=torch.full((n,), scores[i]),
                         pred_classes=torch.zeros(n, dtype=torch.long))
        ev.process([{"image_id": i}], [{"instances": inst}])
    res = ev.evaluate()["image_level"]
    assert res["good_images"] == 10 and res["defect_images"] == 10
    assert res["recall@FA1%"] == 100 and res["false_alarm@FA1%"] == 0 and res["roc_auc"] == pytest.approx(1.0)
    assert (tmp_path / "image_level.json").is_file()


def test_image_level_line_only_when_both_kinds_of_image_exist():
    from steel_fsd.evaluation.report import image_level_line

    res = {"image_level": summarize([0.1, 0.2, 0.3], [0.25, 0.9])}
    assert image_level_line(res).startswith("image level (3 defect-free / 2 defect images): defect recall 50.0% at 1%")
    assert image_level_line({"image_level": summarize([], [0.9])}) is None and image_level_line({}) is None
