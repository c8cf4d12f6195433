"""Few-shot analysis: cell aggregation checked against hand computation, paired stats, convergence, tables,
plots, and the PR curves written by SteelCOCOEvaluator."""
from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import stats

from steel_fsd.evaluation.aggregate import (STATS, aggregate, convergence, csv_header, load_cells, mean_ci, paired,
                                            read_metrics, write_results)
from steel_fsd.evaluation.coco import SteelCOCOEvaluator, read_pr_curves
from steel_fsd.evaluation.fewshot_plots import k_curve, k_curve_series, loss_curves, pr_curves, write_all_plots
from steel_fsd.evaluation.fewshot_tables import convergence_table, fmt, markdown_report
from steel_fsd.evaluation.report import METRICS

CLASSES = ["crazing", "inclusion", "patches"]
SETTINGS = {"cross:neu_synth->severstal_synth": "cross", "base_novel:neu_synth": "base_novel"}
METHODS = ("prototype", "finetune")
SHOTS = (1, 5)
SEEDS = (0, 1, 2)
NAN_CELL = ("cross:neu_synth->severstal_synth", "prototype", 5, 1)  # its inclusion AP is NaN


def metrics_lines(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def loss_log(iters: int = 60, key: str = "bbox/AP") -> str:
    lines = [{"iteration": i, "total_loss": 2.0 / (1 + 0.1 * i), "lr": 0.01} for i in range(iters)]
    lines += [{"iteration": i, "val_total_loss": 2.2 / (1 + 0.1 * i)} for i in range(9, iters, 10)]
    lines += [{"iteration": i, key: 40.0 * (1 - math.exp(-i / 20))} for i in range(19, iters, 20)]
    return metrics_lines(lines)


def pr_file(rng: random.Random) -> dict:
    recall = [r / 100 for r in range(101)]
    curve = sorted((rng.random() for _ in recall), reverse=True)
    return {"iou": 0.5, "iou75": 0.75, "recall": recall,
            "precision": {"crazing": curve, "inclusion": [p * 0.5 for p in curve], "patches": [None] * 101},
            "precision75": {c: [p * 0.8 for p in curve] for c in CLASSES}}


@pytest.fixture(scope="module")
def cells_dir(tmp_path_factory):
    """Cells under ``root/cells`` (plus one single-seed ablation cell), artifacts under ``root/runs``."""
    root = tmp_path_factory.mktemp("fewshot")
    rng = random.Random(0)
    raw = []
    for setting, kind in SETTINGS.items():
        runs = root / "runs" / kind
        runs.mkdir(parents=True)
        (runs / "base_metrics.json").write_text(loss_log())
        for method in METHODS:
            for k in SHOTS:
                for seed in SEEDS:
                    per_class = {c: {m: rng.uniform(0, 100) for m in METRICS} for c in CLASSES}
                    if (setting, method, k, seed) == NAN_CELL:
                        per_class["inclusion"]["AP"] = math.nan
                    cell = {"setting": setting, "kind": kind, "source": "neu_synth", "target": "severstal_synth",
                            "method": method, "shots": k, "seed": seed, "classes": CLASSES,
                            "base_classes": CLASSES[:2] if kind == "base_novel" else [],
                            "novel_classes": CLASSES[2:] if kind == "base_novel" else CLASSES,
                            "metrics": {m: rng.uniform(0, 100) for m in METRICS}, "per_class": per_class,
                            "bAP": None, "nAP": None, "bAP50": None, "nAP50": None, "dbAP50": None,
                            "adapt_s": rng.uniform(0.5, 30), "adapt_iters": 0 if method == "prototype" else 100,
                            "pr_curves": None, "train_metrics": None,
                            "base_metrics": f"../../runs/{kind}/base_metrics.json"}
                    if kind == "base_novel":
                        cell.update({m: rng.uniform(0, 100) for m in ("bAP", "nAP", "bAP50", "nAP50")})
                        cell["dbAP50"] = rng.uniform(-10, 2)
                    run = f"{method}_K{k}_s{seed}"
                    (runs / f"{run}_pr.json").write_text(json.dumps(pr_file(rng)))
                    cell["pr_curves"] = f"../../runs/{kind}/{run}_pr.json"
                    if method == "finetune":
                        (runs / f"{run}_metrics.json").write_text(loss_log(40))
                        cell["train_metrics"] = f"../../runs/{kind}/{run}_metrics.json"
                    path = root / "cells" / kind / f"{run}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(cell))  # NaN written as the NaN token
                    raw.append(cell)
    ablation = {"setting": "ablation:neu_synth", "kind": "ablation", "source": "neu_synth", "target": "neu_synth",
                "method": "no_norm", "shots": 5, "seed": 0, "classes": CLASSES, "base_classes": [],
                "novel_classes": CLASSES, "metrics": {"AP": 12.34, "AP50": 30.0, "AP75": None, "P": 50.0,
                                                      "R": 40.0, "F1": 44.4},
                "per_class": {c: {"AP": 10.0, "AP50": 20.0} for c in CLASSES}, "adapt_s": 1.0, "adapt_iters": 0}
    (root / "cells" / "ablation.json").write_text(json.dumps(ablation))
    raw.append(ablation)
    return root, raw


def hand(values) -> dict:
    """Mean, sample SD and 95% t-interval by plain loops."""
    xs = [float(v) for v in values if v is not None and v == v]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return {"n": n, "mean": mean, "sd": sd, "ci95": stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)}


def assert_stat(got: dict, want: dict) -> None:
    assert got["n"] == want["n"]
    for k in ("mean", "sd", "ci95"):
        assert (got[k] is None) == (want[k] is None), k
        if want[k] is not None:
            assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k


def value(cell: dict, name: str):
    return cell["metrics"].get(name) if name in METRICS else cell.get(name)


@pytest.fixture(scope="module")
def loaded(cells_dir):
    root, raw = cells_dir
    cells = load_cells(str(root / "cells"))
    return root, raw, cells, aggregate(cells, METHODS)


def test_mean_ci_edge_cases():
    assert mean_ci([]) == {"mean": None, "ci95": None, "n": 0, "sd": None, "values": []}
    assert mean_ci([None, math.nan, 3.0]) == {"mean": 3.0, "ci95": None, "n": 1, "sd": None, "values": [3.0]}
    assert mean_ci([2.0, 2.0])["ci95"] == 0.0
    assert_stat(mean_ci([1.0, 2.0, 4.0, math.nan]), hand([1.0, 2.0, 4.0]))


def test_aggregate_equals_hand_computation(loaded):
    root, raw, cells, rows = loaded
    assert len(cells) == len(raw) == 25
    assert all(Path(c["_path"]).is_file() for c in cells)
    assert [(r["setting"], r["method"], r["shots"]) for r in rows] == [("ablation:neu_synth", "no_norm", 5)] + [
        (s, m, k) for s in sorted(SETTINGS) for m in METHODS for k in SHOTS]
    # the method order is the caller's (a protocol file's METHODS); methods not in it follow alphabetically
    assert [r["method"] for r in aggregate(cells) if r["shots"] == 1 and r["setting"] == sorted(SETTINGS)[0]] == \
        sorted(METHODS)
    assert [r["method"] for r in aggregate(cells, ["finetune"]) if r["shots"] == 1 and
            r["setting"] == sorted(SETTINGS)[0]] == ["finetune", "prototype"]
    for row in rows:
        key = (row["setting"], row["method"], row["shots"])
        group = [c for c in raw if (c["setting"], c["method"], c["shots"]) == key]
        assert row["seeds"] == sorted(c["seed"] for c in group) and row["n"] == len(group)
        assert row["kind"] == group[0]["kind"] and row["classes"] == CLASSES
        for name in STATS:
            values = [value(c, name) for c in group]
            if all(v is None for v in values):
                assert name not in row
            else:
                assert_stat(row[name], hand(values))
        for cls in CLASSES:
            for m in ("AP", "AP50"):
                assert_stat(row["per_class"][cls][m], hand(c["per_class"][cls][m] for c in group))
    nan_row = next(r for r in rows if (r["setting"], r["method"], r["shots"]) == NAN_CELL[:3])
    assert nan_row["per_class"]["inclusion"]["AP"]["n"] == 2 and nan_row["per_class"]["crazing"]["AP"]["n"] == 3
    cross = next(r for r in rows if r["kind"] == "cross")
    assert "bAP" not in cross and "nAP" in next(r for r in rows if r["kind"] == "base_novel")


def test_paired_equals_loop(loaded):
    _, raw, cells, _ = loaded
    got = paired(cells, "prototype", "finetune", ("AP50", "AP", "nAP50", "nAP"))
    want = []
    for setting in sorted(SETTINGS):
        for k in SHOTS:
            for metric in ("AP50", "AP", "nAP50", "nAP"):
                diffs, wins = [], 0
                for seed in SEEDS:
                    a, b = (next(c for c in raw if (c["setting"], c["method"], c["shots"], c["seed"]) ==
                                 (setting, m, k, seed)) for m in METHODS)
                    if value(a, metric) is None:
                        continue
                    diffs.append(value(a, metric) - value(b, metric))
                    wins += diffs[-1] > 0
                if diffs:
                    want.append((setting, k, metric, diffs, wins))
    assert [(r["setting"], r["shots"], r["metric"]) for r in got] == [w[:3] for w in want]
    assert len(got) == 2 * 2 + 2 * 4  # nAP50 and nAP only for base_novel
    assert [r["metric"] for r in paired(cells)] == [r["metric"] for r in got]  # the default metrics
    for r, (setting, k, metric, diffs, wins) in zip(got, want):
        assert r["diffs"] == pytest.approx(diffs) and r["seeds"] == list(SEEDS)
        assert_stat(r["diff"], hand(diffs))
        assert (r["wins"], r["losses"], r["ties"]) == (wins, len(diffs) - wins, 0)
        assert r["p"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)  # paired t == one-sample t on diffs
    same = paired(cells, "prototype", "prototype", ("AP",))
    assert all(r["p"] is None and r["ties"] == 3 for r in same)


def test_write_results_csv_round_trip(loaded, tmp_path):
    root, _, cells, rows = loaded
    prs = paired(cells)
    json_path, csv_path = write_results(rows, prs, str(tmp_path / "a"), cells)
    write_results(rows, prs, str(tmp_path / "b"), cells)
    assert Path(json_path).read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    assert Path(csv_path).read_bytes() == (tmp_path / "b" / "results.csv").read_bytes()
    doc = json.loads(Path(json_path).read_text())
    assert len(doc["cells"]) == 25 and len(doc["paired"]) == len(prs)
    assert doc["cells"][0]["path"].startswith("..") and "_path" not in doc["cells"][0]
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == csv_header()
        lines = list(reader)
    assert len(lines) == len(doc["rows"])
    for line, row in zip(lines, doc["rows"]):
        assert [line[k] for k in ("setting", "kind", "method")] == [row[k] for k in ("setting", "kind", "method")]
        assert (int(line["shots"]), int(line["n"])) == (row["shots"], row["n"])
        for name in STATS:
            for s in ("mean", "ci95"):
                want = (row.get(name) or {}).get(s)
                assert (line[f"{name}_{s}"] == "") == (want is None)
                if want is not None:
                    assert float(line[f"{name}_{s}"]) == want


def test_read_metrics_and_convergence(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(metrics_lines([
        {"iteration": 0, "total_loss": 2.0},
        {"iteration": 99, "total_loss": 1.0, "val_total_loss": 1.2},
        {"iteration": 99, "bbox/AP": 10.0},
        {"iteration": 199, "bbox/AP": 30.0, "total_loss": 0.9},
        {"iteration": 299, "bbox/AP": 35.0},  # first run dies here; resumed from iteration 149
        {"iteration": 199, "bbox/AP": 38.0, "total_loss": 0.8},
        {"iteration": 299, "bbox/AP": 39.0},
        {"iteration": 399, "bbox/AP": 40.0},
    ]) + "\n")
    records = read_metrics(str(path))
    assert [r["iteration"] for r in records] == [0, 99, 199, 299, 399]
    assert records[1] == {"iteration": 99, "total_loss": 1.0, "val_total_loss": 1.2, "bbox/AP": 10.0}
    assert records[2]["bbox/AP"] == 38.0 and records[3]["bbox/AP"] == 39.0
    got = convergence(str(path), "bbox/AP", 0.95, ims_per_batch=4, num_images=100)
    assert (got["iteration"], got["value"], got["final"], got["final_iteration"]) == (199, 38.0, 40.0, 399)
    assert got["epochs"] == pytest.approx(8.0) and got["target"] == pytest.approx(38.0)
    assert convergence(str(path), fraction=0.97)["iteration"] == 299
    assert convergence(str(path))["epochs"] is None

    prefixed = tmp_path / "prefixed.json"
    prefixed.write_text(path.read_text().replace('"bbox/AP"', '"neu_synth_val/bbox/AP"'))
    assert convergence(str(prefixed))["iteration"] == 199
    assert convergence(str(prefixed))["key"] == "neu_synth_val/bbox/AP"
    missing = convergence(str(prefixed), key="bbox/AP50")
    assert all(missing[k] is None for k in ("key", "iteration", "epochs", "value", "final", "final_iteration"))
    both = tmp_path / "both.json"
    both.write_text(path.read_text() + prefixed.read_text())
    with pytest.raises(ValueError, match="full key"):
        convergence(str(both))


def test_tables(loaded, tmp_path):
    _, raw, cells, rows = loaded
    conv_path = tmp_path / "metrics.json"
    conv_path.write_text(metrics_lines([{"iteration": 99, "bbox/AP": 20.0}, {"iteration": 199, "bbox/AP": 40.0}]))
    conv = [{"method": "finetune", "setting": "cross", **convergence(str(conv_path), ims_per_batch=2, num_images=50)}]
    report = markdown_report(rows, paired(cells), conv)
    for heading in ("## Table 3: cross-dataset", "## Base/novel split", "## Table 5: ablations",
                    "## Paired comparison", "## Convergence", "## Per-class AP", "## Per-class AP50"):
        assert heading in report
    assert "Table 2" not in report and "Table 4" not in report  # no preprocessing / kshot cells

    def cell_text(stat: dict) -> str:
        return f"{stat['mean']:.1f} ± {stat['ci95']:.1f}"

    def md_rows(text: str) -> list[tuple]:
        """Every Markdown table row of ``text`` as its stripped cells (column padding does not matter)."""
        return [tuple(c.strip() for c in line.strip().strip("|").split("|")) for line in text.splitlines()
                if line.startswith("|")]

    table_rows = md_rows(report)

    group = [c for c in raw if (c["setting"], c["method"], c["shots"]) == ("cross:neu_synth->severstal_synth",
                                                                            "prototype", 1)]
    cols = [cell_text(hand(value(c, m) for c in group)) for m in ("AP", "AP50", "AP75", "P", "R", "F1", "adapt_s")]
    assert ("prototype", "1", "3", *cols) in table_rows
    group = [c for c in raw if (c["setting"], c["method"], c["shots"]) == ("base_novel:neu_synth", "finetune", 5)]
    cols = [cell_text(hand(value(c, m) for c in group))
            for m in ("bAP", "nAP", "AP", "AP50", "nAP50", "bAP50", "dbAP50", "F1", "adapt_s")]
    assert ("finetune", "5", "3", *cols) in table_rows
    assert ("no_norm", "1", "12.3", "30.0", "–", "50.0", "40.0", "44.4") in table_rows  # n=1, single K, missing AP75
    nan_group = [c for c in raw if (c["setting"], c["method"], c["shots"]) == NAN_CELL[:3]]
    assert f"{hand(c['per_class']['inclusion']['AP'] for c in nan_group)['mean']:.1f} ± " in report
    pr = paired(cells)[0]
    assert (pr["setting"], str(pr["shots"]), "AP50", "prototype − finetune", cell_text(hand(pr["diffs"])), "3") \
        == next(r for r in table_rows if r[:2] == (pr["setting"], str(pr["shots"])) and r[2] == "AP50")[:6]
    assert ("finetune", "cross", "199", "8.00", "40.0") in table_rows
    assert fmt(None) == "–" and fmt({"mean": 1.25, "ci95": None}) == "1.2"
    assert md_rows(convergence_table([{"method": "m", "setting": "s", "iteration": None, "epochs": None,
                                       "final": None}]))[-1] == ("m", "s", "–", "–", "–")


def assert_png(path) -> None:
    assert Path(path).stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
        im.verify()


def test_plots(loaded, tmp_path, caplog):
    root, _, cells, rows = loaded
    with caplog.at_level("INFO", logger="steel_fsd"):
        paths = write_all_plots(rows, cells, str(tmp_path / "plots"))
    names = sorted(Path(p).name for p in paths)
    want = ["ablation_neu_synth_AP.png", "ablation_neu_synth_AP50.png", "ablation_neu_synth_per_class_K5.png"]
    for s in ("base_novel_neu_synth", "cross_neu_synth_to_severstal_synth"):
        want += [f"{s}_{x}.png" for x in ("AP", "AP50", "per_class_K5", "loss", "pr_K5")]
    want.append("cross_neu_synth_to_severstal_synth_K_curve.png")  # cross settings: AP50 against K
    assert names == sorted(want)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(want)
    for p in paths:
        assert_png(p)
    assert "ablation:neu_synth has no metrics files or PR curves" in caplog.text

    log = tmp_path / "prefixed_metrics.json"
    log.write_text(loss_log(key="neu_synth_val/bbox/AP"))
    assert_png(loss_curves({"base": str(log)}, str(tmp_path / "loss.png")))
    curves = {"a": read_pr_curves(str(root / "runs" / "cross" / "prototype_K5_s0_pr.json")),
              "b": json.loads((root / "runs" / "cross" / "finetune_K5_s0_pr.json").read_text())}
    assert_png(pr_curves(curves, str(tmp_path / "pr_mean.png"), mean=True, iou=0.75))
    assert pr_curves({}, str(tmp_path / "none.png")) is None and not (tmp_path / "none.png").exists()


def test_load_cells_rejects_bad_files(tmp_path):
    (tmp_path / "sub").mkdir()
    good = {"setting": "s", "kind": "cross", "method": "prototype", "shots": 1, "seed": 0, "classes": ["a"],
            "metrics": {"AP": 1.0}, "per_class": {"a": {"AP": 1.0}}}
    (tmp_path / "a.json").write_text(json.dumps(good))
    (tmp_path / "sub" / "bad_cell.json").write_text(json.dumps({k: v for k, v in good.items() if k != "metrics"}))
    with pytest.raises(ValueError, match=r"bad_cell\.json.*metrics"):
        load_cells(str(tmp_path))
    (tmp_path / "sub" / "bad_cell.json").write_text(json.dumps(dict(good, kind="other")))
    with pytest.raises(ValueError, match=r"bad_cell\.json.*kind"):
        load_cells(str(tmp_path))
    (tmp_path / "sub" / "bad_cell.json").write_text(json.dumps(dict(good, method="finetune")))
    assert [c["method"] for c in load_cells(str(tmp_path))] == ["prototype", "finetune"]  # sorted paths
    (tmp_path / "sub" / "bad_cell.json").write_text(json.dumps(good))
    with pytest.raises(ValueError, match="both"):
        aggregate(load_cells(str(tmp_path)))


def test_evaluator_writes_pr_curves(tmp_path):
    """PR curves of a hand-made case: class a has 2 GT, detections TP .9, FP .8 (other image) and .7 at IoU 0.6;
    class b has a GT and no detection; class c a detection and no GT."""
    xyxy = BoxMode.XYXY_ABS
    gt = [{"bbox": [0, 0, 10, 10], "bbox_mode": xyxy, "category_id": 0, "iscrowd": 0},
          {"bbox": [20, 20, 30, 30], "bbox_mode": xyxy, "category_id": 0, "iscrowd": 0},
          {"bbox": [60, 60, 80, 80], "bbox_mode": xyxy, "category_id": 1, "iscrowd": 0}]
    dicts = [{"file_name": "1.png", "image_id": 1, "height": 100, "width": 100, "annotations": gt},
             {"file_name": "2.png", "image_id": 2, "height": 100, "width": 100, "annotations": []}]
    name, classes = "steel_fsd_test_pr_curves", ["a", "b", "c"]
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).thing_classes = classes
    try:
        ev = SteelCOCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=str(tmp_path))
        ev.reset()
        for image_id, boxes, scores, labels in ((1, [[0, 0, 10, 10], [20, 20, 30, 26], [40, 40, 50, 50]], [.9, .7, .5],
                                                 [0, 0, 2]), (2, [[0, 0, 10, 10]], [.8], [0])):
            inst = Instances((100, 100), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                             scores=torch.tensor(scores), pred_classes=torch.tensor(labels))
            ev.process([{"image_id": image_id}], [{"instances": inst}])
        results = ev.evaluate()["bbox"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    raw = json.loads((tmp_path / "pr_curves.json").read_text())
    assert (raw["iou"], raw["iou75"], len(raw["recall"])) == (0.5, 0.75, 101)
    recall = np.asarray(raw["recall"])
    assert raw["precision"]["a"] == pytest.approx(list(np.where(recall <= 0.5, 1.0, 2 / 3)))
    assert raw["precision75"]["a"] == pytest.approx(list(np.where(recall <= 0.5, 1.0, 0.0)))
    assert raw["precision"]["b"] == [0.0] * 101 and raw["precision"]["c"] == [None] * 101
    assert results["AP50-a"] == pytest.approx(100 * np.mean(raw["precision"]["a"]))
    assert math.isnan(results["AP50-c"])

    # the same numbers from pycocotools' own COCOeval on the evaluator's COCO files
    api = COCO(str(tmp_path / f"{name}_coco_format.json"))
    coco_eval = COCOeval(api, api.loadRes(str(tmp_path / "coco_instances_results.json")), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    curves = read_pr_curves(str(tmp_path / "pr_curves.json"))
    np.testing.assert_allclose(curves["recall"], coco_eval.params.recThrs)
    for field, t in (("precision", 0), ("precision75", 5)):
        assert coco_eval.params.iouThrs[t] == pytest.approx(0.5 if t == 0 else 0.75)
        for k, c in enumerate(classes):
            want = coco_eval.eval["precision"][t, :, k, 0, -1]
            np.testing.assert_allclose(curves[field][c], np.where(want > -1, want, np.nan))


def test_bounds_image_level_columns_and_k_curve(tmp_path):
    """A cross setting with its target's K-shot (lower bound) and full-data (upper bound) rows: the K curve's
    series and bounds, and the report's image-level columns, against hand-computed means."""
    rng = random.Random(1)

    def cell(setting, kind, method, k, seed, **fields):
        return {"setting": setting, "kind": kind, "source": "src" if kind == "cross" else "t", "target": "t",
                "method": method, "shots": k, "seed": seed, "classes": ["a"], "base_classes": [],
                "novel_classes": ["a"], "metrics": {m: rng.uniform(0, 100) for m in METRICS},
                "per_class": {"a": {"AP": 1.0, "AP50": 2.0}}, "adapt_s": 1.0, "adapt_iters": 0, **fields}
    cells = [cell("cross_src-t", "cross", m, k, s, **{"img_R@FA1": rng.uniform(0, 100), "img_AUC": rng.uniform(50, 99)})
             for m in ("prototype", "finetune") for k in (1, 5) for s in (0, 1, 2)]
    cells += [cell("kshot_t", "kshot", "finetune", k, s) for k in (1, 5) for s in (0, 1)]
    cells += [cell("full_data_t", "full_data", "stock, t", 0, 0), cell("full_data_other", "full_data", "x", 0, 0)]
    cells[-1]["target"] = "other"
    rows = aggregate(cells, ["prototype", "finetune"])
    series, bounds = k_curve_series(rows, "cross_src-t")
    assert list(series) == ["prototype", "finetune", "finetune, K shots alone"]
    for label, setting, method in (("prototype", "cross_src-t", "prototype"),
                                   ("finetune, K shots alone", "kshot_t", "finetune")):
        ks, means, cis = series[label]
        assert ks == [1, 5]
        for k, mean, ci in zip(ks, means, cis):
            want = hand(c["metrics"]["AP50"] for c in cells if (c["setting"], c["method"], c["shots"]) == (setting, method, k))
            assert mean == pytest.approx(want["mean"]) and ci == pytest.approx(want["ci95"])
    assert bounds == {"full data: stock, t": pytest.approx(cells[-2]["metrics"]["AP50"])}  # not the other target's
    assert_png(k_curve(rows, "cross_src-t", str(tmp_path / "k.png")))
    assert k_curve(rows, "no_such_setting", str(tmp_path / "none.png")) is None

    report = markdown_report(rows)
    assert "## Upper bound: trained on the whole target train split" in report
    lines = [tuple(c.strip() for c in line.strip().strip("|").split("|")) for line in report.splitlines()
             if line.startswith("|")]
    header = next(r for r in lines if "img R@1%FA" in r)
    assert header[-2:] == ("img R@1%FA", "img AUC")  # no row has a recall at 5%: that column is left out
    group = [c for c in cells if (c["setting"], c["method"], c["shots"]) == ("cross_src-t", "finetune", 5)]
    row = next(r for r in lines if r[:2] == ("finetune", "5") and len(r) == len(header))
    want = [hand(c[f] for c in group) for f in ("img_R@FA1", "img_AUC")]
    assert row[-2] == f"{want[0]['mean']:.1f} ± {want[0]['ci95']:.1f}"
    assert row[-1] == f"{want[1]['mean']:.1f} ± {want[1]['ci95']:.1f}"
    assert not any("img R@1%FA" in r for r in lines if "kshot" in " ".join(r))  # no image-level numbers there
