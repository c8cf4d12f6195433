"""PNG plots of few-shot results: bars with 95% CIs, per-class bars, loss curves and PR curves.

Figures are drawn with :class:`matplotlib.figure.Figure` (Agg canvas, no pyplot state). Each plotting
function returns the written path, or None (logged to ``steel_fsd``) when it has nothing to draw.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..utils.io import save_figure
from .aggregate import cell_file, matching_keys, method_sort_key, metric_series, read_metrics
from .coco import PR_IOUS, read_pr_curves
from .fewshot_tables import settings_of

logger = logging.getLogger("steel_fsd")
DPI = 100


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")  # keeps legends placed outside the axes


def _stat(row: dict | None, metric: str) -> tuple[float, float]:
    """(mean, ci95) of a row's metric; NaN mean when missing, 0 error without a CI."""
    stat = (row or {}).get(metric) or {}
    mean, ci = stat.get("mean"), stat.get("ci95")
    return (math.nan if mean is None else mean), (0.0 if ci is None else ci)


def _grouped_bars(ax, groups: list[str], series: dict[str, list[tuple[float, float]]]) -> None:
    """Bars of ``series`` (label -> (mean, ci) per group) side by side in each group, CI error bars."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        means, cis = zip(*values)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=cis, capsize=3, color=f"C{i}",
               label=label)
    ax.set_xticks(x, groups)
    ax.legend(fontsize=8)


def bar_chart(rows: list[dict], setting: str, metric: str, path: str) -> str | None:
    """Grouped bars of ``metric`` for one setting: x = K, one bar per method, 95% CI error bars."""
    sub = [r for r in rows if r["setting"] == setting and (r.get(metric) or {}).get("mean") is not None]
    if not sub:
        logger.info("bar_chart: no %s for %s", metric, setting)
        return None
    shots = sorted({r["shots"] for r in sub})
    methods = list(dict.fromkeys(r["method"] for r in sub))  # rows come in method order (aggregate)
    by = {(r["method"], r["shots"]): r for r in sub}
    fig = Figure(figsize=(max(5.0, 1.5 + 1.2 * len(shots) * max(1, len(methods) / 2)), 4))
    ax = fig.subplots()
    _grouped_bars(ax, [f"K={k}" for k in shots], {m: [_stat(by.get((m, k)), metric) for k in shots] for m in methods})
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{setting}\n{metric}, mean ± 95% CI over seeds", fontsize=9)
    return _save(fig, path)


def per_class_bars(rows: list[dict], setting: str, shots: int, path: str, metric: str = "AP50") -> str | None:
    """Per-class ``metric`` bars of one setting at K = ``shots``, one bar per method, 95% CI error bars."""
    sub = [r for r in rows if r["setting"] == setting and r["shots"] == shots and r.get("per_class")]
    if not sub:
        logger.info("per_class_bars: no rows for %s at K=%s", setting, shots)
        return None
    classes = list(dict.fromkeys(c for r in sub for c in r["per_class"]))
    fig = Figure(figsize=(max(5.0, 2 + 0.9 * len(classes) * max(1, len(sub) / 2)), 4))
    ax = fig.subplots()
    _grouped_bars(ax, classes, {r["method"]: [_stat(r["per_class"].get(c), metric) for c in classes] for r in sub})
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{setting}, K={shots}\nper-class {metric}, mean ± 95% CI over seeds", fontsize=9)
    return _save(fig, path)


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points (fewer at the start); same length as ``values``."""
    v = np.asarray(values, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(0, i - window)
    return (csum[i] - csum[lo]) / (i - lo)


def loss_curves(metrics_paths: dict[str, str], path: str, key: str = "bbox/AP", window: int = 20) -> str | None:
    """Training ``total_loss`` (raw, light, and its moving average) and ``val_total_loss`` vs iteration,
    one colour per label; a second panel with the validation ``key`` (e.g. bbox/AP) when logged."""
    loaded = {label: read_metrics(p) for label, p in metrics_paths.items()}
    evals = {label: matching_keys(recs, key) for label, recs in loaded.items()}
    if not any(metric_series(recs, n)[0] for recs in loaded.values() for n in ("total_loss", "val_total_loss")):
        logger.info("loss_curves: no losses in %s", list(metrics_paths.values()))
        return None
    with_ap = any(evals.values())
    fig = Figure(figsize=(12 if with_ap else 7, 4.5))
    axes = fig.subplots(1, 2 if with_ap else 1, squeeze=False)[0]
    for i, (label, recs) in enumerate(loaded.items()):
        it, loss = metric_series(recs, "total_loss")
        if it:
            axes[0].plot(it, loss, color=f"C{i}", alpha=0.25, lw=0.8)
            axes[0].plot(it, moving_average(loss, window), color=f"C{i}", lw=1.5, label=f"{label} train")
        it, val = metric_series(recs, "val_total_loss")
        if it:
            axes[0].plot(it, val, color=f"C{i}", ls="--", marker="o", ms=3, label=f"{label} val")
        for name in evals[label]:
            it, ap = metric_series(recs, name)
            axes[1].plot(it, ap, color=f"C{i}", marker="o", ms=3,
                         label=label if len(evals[label]) == 1 else f"{label} {name}")
    axes[0].set(xlabel="iteration", ylabel="loss", title=f"total loss (moving average over {window})")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.2))  # below: curves stay visible
    if with_ap:
        axes[1].set(xlabel="iteration", ylabel=f"{key} (%)", title=f"validation {key}")
        axes[1].legend(fontsize=7)
    return _save(fig, path)


def _mean_curve(precision: dict[str, np.ndarray], classes: list[str]) -> np.ndarray | None:
    stack = [np.asarray(precision[c], dtype=float) for c in classes if c in precision]
    if not stack:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # recall levels undefined for every class
        return np.nanmean(np.vstack(stack), axis=0)


def pr_curves(curves: dict[str, dict], path: str, classes: list[str] | None = None, iou: float = 0.5,
              mean: bool = False) -> str | None:
    """Precision vs recall at ``iou`` (0.5 or 0.75), one line per label (e.g. method at K).

    One subplot per class (``classes``, default all), or a single one of the mean over classes (``mean``).
    ``curves`` hold ``pr_curves.json`` contents (lists with nulls or :func:`~.coco.read_pr_curves` arrays).
    """
    field = {thr: f for f, thr in PR_IOUS.items()}[iou]
    names = classes or list(dict.fromkeys(c for cur in curves.values() for c in cur.get(field, {})))
    if not curves or not names:
        logger.info("pr_curves: nothing to plot for %s", path)
        return None
    panels = ["mean over classes"] if mean else names
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4 * cols, 3.5 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        for i, (label, cur) in enumerate(curves.items()):
            precision = cur.get(field, {})
            y = _mean_curve(precision, names) if mean else precision.get(panel)
            y = None if y is None else np.asarray(y, dtype=float)
            if y is not None and not np.isnan(y).all():
                ax.plot(np.asarray(cur["recall"], dtype=float), y, color=f"C{i}", label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"{panel} (IoU {iou})")
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "undefined (no ground truth)", ha="center", va="center", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _save(fig, path)


def k_curve_series(rows: list[dict], setting: str, metric: str = "AP50") -> tuple[dict, dict]:
    """What :func:`k_curve` draws: ``({label: (K list, mean list, ci list)}, {label: mean})``. Lines: each method
    of the cross ``setting``, then each method of its target's K-shot setting (label ``"<method>, K shots alone"``:
    the lower bound); bounds: the target's full-data rows (label ``"full data: <row>"``: the upper bound)."""
    measured = [r for r in rows if (r.get(metric) or {}).get("mean") is not None]
    sub = [r for r in measured if r["setting"] == setting]
    if not sub:
        return {}, {}
    target = sub[0]["target"]
    lines: dict[str, list] = {}
    for r in sub + [r for r in measured if r["kind"] == "kshot" and r["target"] == target]:
        label = r["method"] + ("" if r["setting"] == setting else ", K shots alone")
        lines.setdefault(label, []).append((r["shots"], *_stat(r, metric)))
    series = {label: tuple(list(v) for v in zip(*sorted(pts))) for label, pts in lines.items()}
    bounds = {f"full data: {r['method']}": _stat(r, metric)[0] for r in measured
              if r["kind"] == "full_data" and r["target"] == target}
    return series, bounds


def k_curve(rows: list[dict], setting: str, path: str, metric: str = "AP50") -> str | None:
    """``metric`` against K for one cross setting (:func:`k_curve_series`): a line with its 95% CI band per method,
    the target's K-shot rows dashed, its full-data rows as dotted horizontal lines."""
    series, bounds = k_curve_series(rows, setting, metric)
    if not series:
        logger.info("k_curve: no %s for %s", metric, setting)
        return None
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for i, (label, (k, mean, ci)) in enumerate(series.items()):
        k, mean, ci = (np.asarray(v, dtype=float) for v in (k, mean, ci))
        ax.plot(k, mean, "--" if label.endswith("K shots alone") else "-", marker="o", color=f"C{i % 10}", label=label)
        ax.fill_between(k, mean - ci, mean + ci, color=f"C{i % 10}", alpha=0.15)
    for j, (label, mean) in enumerate(bounds.items()):
        ax.axhline(mean, color=f"C{(len(series) + j) % 10}", linestyle=":", label=f"{label} ({mean:.1f})")
    ax.set_xticks(sorted({k for ks, _, _ in series.values() for k in ks}))
    ax.set_xlabel("K (boxes per target class)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{setting}: {metric} against K, mean ± 95% CI over seeds", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def slug(setting: str) -> str:
    """A file-name-safe form of a setting label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", setting.replace("->", "_to_")).strip("_")


def _first_seed(cells: list[dict], method_order=()) -> dict[tuple[str, int], dict]:
    """The lowest-seed cell per (method, K), in method order then K."""
    out: dict[tuple[str, int], dict] = {}
    key = method_sort_key(method_order)
    for c in sorted(cells, key=lambda c: (key(c["method"]), int(c["shots"]), int(c["seed"]))):
        out.setdefault((c["method"], int(c["shots"])), c)
    return out


def _loss_files(cells: list[dict], method_order=()) -> dict[str, str]:
    """Distinct base-training metrics files, then the fine-tune metrics file of each (method, K) at its lowest seed."""
    base = list(dict.fromkeys(os.path.realpath(p) for p in (cell_file(c, "base_metrics") for c in cells) if p))
    files = {("base" if len(base) == 1 else f"base: {os.path.basename(os.path.dirname(p))}"): p for p in base}
    for (method, shots), c in _first_seed(cells, method_order).items():
        p = cell_file(c, "train_metrics")
        if p and os.path.realpath(p) not in files.values():
            files[f"{method} K={shots}"] = os.path.realpath(p)
    return files


def write_all_plots(rows: list[dict], cells: list[dict], out_dir: str) -> list[str]:
    """The standard plots per setting, returning the paths written:

    ``<setting>_AP50.png`` / ``<setting>_AP.png`` (bars over K), ``<setting>_per_class_K<k>.png`` (largest K),
    ``<setting>_loss.png`` (distinct base metrics + each method/K's lowest-seed fine-tune metrics) and
    ``<setting>_pr_K<k>.png`` (lowest seed of each method at the largest K); for cross settings also
    ``<setting>_K_curve.png`` (:func:`k_curve`: AP50 against K with the target's K-shot and full-data bounds).
    """
    paths = []
    for setting in settings_of(rows):
        name = os.path.join(out_dir, slug(setting))
        if any(r["kind"] == "cross" for r in rows if r["setting"] == setting):
            paths.append(k_curve(rows, setting, f"{name}_K_curve.png"))
        kmax = max(r["shots"] for r in rows if r["setting"] == setting)
        paths += [bar_chart(rows, setting, m, f"{name}_{m}.png") for m in ("AP50", "AP")]
        paths.append(per_class_bars(rows, setting, kmax, f"{name}_per_class_K{kmax}.png"))
        sub = [c for c in cells if c["setting"] == setting]
        order = list(dict.fromkeys(r["method"] for r in rows))  # rows come in method order (aggregate)
        files = _loss_files(sub, order)
        paths.append(loss_curves(files, f"{name}_loss.png") if files else None)
        curves = {f"{m} K={k}": read_pr_curves(p) for (m, k), c in _first_seed(sub, order).items()
                  if k == kmax and (p := cell_file(c, "pr_curves"))}
        paths.append(pr_curves(curves, f"{name}_pr_K{kmax}.png") if curves else None)
        if not files or not curves:
            logger.info("write_all_plots: %s has no %s", setting,
                        " or ".join(w for w, have in (("metrics files", files), ("PR curves", curves)) if not have))
    return [p for p in paths if p]
