"""Markdown tables of aggregated few-shot results (rows from :func:`~.aggregate.aggregate`), paper layout.

Cells read ``mean ± ci95`` (95% t-interval over seeds), just the mean for one seed, ``–`` when missing.
"""
from __future__ import annotations

from collections.abc import Iterable

from tabulate import tabulate

DASH = "–"
MAIN_COLUMNS = (("mAP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("P", "P"), ("R", "R"), ("F1", "F1"),
                ("adapt s", "adapt_s"))
# image-level accept/reject, shown for the settings whose test split has defect-free images
IMAGE_COLUMNS = (("img R@1%FA", "img_R@FA1"), ("img R@5%FA", "img_R@FA5"), ("img AUC", "img_AUC"))
BASE_NOVEL_COLUMNS = (("bAP", "bAP"), ("nAP", "nAP"), ("mAP", "AP"), ("AP50", "AP50"), ("nAP50", "nAP50"),
                      ("bAP50", "bAP50"), ("bAP50 − base", "dbAP50"), ("F1", "F1"), ("adapt s", "adapt_s"))
ABLATION_COLUMNS = MAIN_COLUMNS[:-1]
# (kind, heading, columns, K column even when a setting has a single K), in report order
KIND_TABLES = (
    ("preprocessing", "Table 2: preprocessing on/off", ABLATION_COLUMNS, False),
    ("cross", "Table 3: cross-dataset few-shot detection", MAIN_COLUMNS, True),
    ("kshot", "Table 4: in-domain K-shot detection", MAIN_COLUMNS, True),
    ("base_novel", "Base/novel split (bAP: base classes, nAP: novel classes)", BASE_NOVEL_COLUMNS, True),
    ("ablation", "Table 5: ablations", ABLATION_COLUMNS, False),
    ("full_data", "Upper bound: trained on the whole target train split", ABLATION_COLUMNS, False),
)
NOTE = "Mean ± 95% CI (t-interval over n seeds; the mean alone for n = 1); metrics in %"


def fmt(stat: dict | None, digits: int = 1) -> str:
    """``"41.2 ± 3.1"`` from a :func:`~.aggregate.mean_ci` dict; the mean alone without a CI; ``–`` if missing."""
    if not stat or stat.get("mean") is None:
        return DASH
    if stat.get("ci95") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f}"


def fmt_p(p: float | None) -> str:
    """A p-value to three decimals (``<0.001`` below), ``–`` when undefined."""
    if p is None:
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown_table(header: list[str], body: Iterable[list]) -> str:
    """A GitHub-flavoured Markdown table (tabulate), cells written as given (no number re-formatting)."""
    return tabulate([[str(v) for v in r] for r in body], headers=header, tablefmt="github", disable_numparse=True)


def settings_of(rows: list[dict], kind: str | None = None) -> list[str]:
    """Settings in row order (first appearance), optionally of one kind."""
    return list(dict.fromkeys(r["setting"] for r in rows if kind is None or r["kind"] == kind))


def kind_tables(rows: list[dict], kind: str, columns=MAIN_COLUMNS, always_k: bool = True) -> str:
    """One table per setting of ``kind``: rows (method[, K]), then n and ``columns`` (header, stat key).

    The K column is left out when ``always_k`` is False and the setting has a single K; the image-level columns
    (:data:`IMAGE_COLUMNS`) are added where any row of the setting has them.
    """
    parts = []
    for setting in settings_of(rows, kind):
        sub = [r for r in rows if r["kind"] == kind and r["setting"] == setting]
        with_k = always_k or len({r["shots"] for r in sub}) > 1
        cols = tuple(columns) + tuple(c for c in IMAGE_COLUMNS if any((r.get(c[1]) or {}).get("mean") is not None
                                                                     for r in sub))
        header = ["method"] + (["K"] if with_k else []) + ["n"] + [h for h, _ in cols]
        body = [[r["method"]] + ([r["shots"]] if with_k else []) + [r["n"]] + [fmt(r.get(k)) for _, k in cols]
                for r in sub]
        parts.append(f"**{setting}**\n\n" + markdown_table(header, body))
    return "\n\n".join(parts)


def per_class_table(rows: list[dict], setting: str, metric: str = "AP") -> str:
    """Per-class ``metric`` of one setting: rows (method, K), columns the classes."""
    sub = [r for r in rows if r["setting"] == setting]
    classes = list(dict.fromkeys(c for r in sub for c in r.get("per_class", {})))
    if not classes:
        return ""
    body = [[r["method"], r["shots"]] + [fmt(r["per_class"].get(c, {}).get(metric)) for c in classes] for r in sub]
    return f"**{setting}** ({metric})\n\n" + markdown_table(["method", "K"] + classes, body)


def paired_table(paired_rows: list[dict]) -> str:
    """Seed-paired differences (:func:`~.aggregate.paired`): mean ± CI, wins/losses/ties of A, p-value."""
    body = [[r["setting"], r["shots"], r["metric"], f"{r['a']} − {r['b']}", fmt(r["diff"]), r["diff"]["n"],
             f"{r['wins']}/{r['losses']}/{r['ties']}", fmt_p(r["p"])] for r in paired_rows]
    header = ["setting", "K", "metric", "A − B", "mean diff", "n", "W/L/T", "p (paired t)"]
    return markdown_table(header, body) if body else ""


def convergence_table(convergence_rows: list[dict]) -> str:
    """Iterations (and epochs) to reach a fraction of the final validation metric, per method and setting."""
    def num(v, spec: str) -> str:
        return DASH if v is None else format(v, spec)
    body = [[r["method"], r["setting"], num(r.get("iteration"), "d"), num(r.get("epochs"), ".2f"),
             num(r.get("final"), ".1f")] for r in convergence_rows]
    return markdown_table(["method", "setting", "iteration", "epochs", "final"], body) if body else ""


def markdown_report(rows: list[dict], paired_rows: list[dict] = (), convergence_rows: list[dict] = ()) -> str:
    """All non-empty tables under ``##`` headings: Tables 2-5, base/novel, paired, convergence, per class."""
    sections = [(title, NOTE + ", adapt s in seconds.", kind_tables(rows, kind, columns, always_k))
                for kind, title, columns, always_k in KIND_TABLES]
    sections.append(("Paired comparison (per-seed differences)", "", paired_table(list(paired_rows))))
    sections.append(("Convergence (first iteration reaching the fraction of the final validation AP)", "",
                     convergence_table(list(convergence_rows))))
    for metric in ("AP", "AP50"):
        tables = (per_class_table(rows, s, metric) for s in settings_of(rows))
        sections.append((f"Per-class {metric}", NOTE + ".", "\n\n".join(t for t in tables if t)))
    text = "\n\n".join("\n\n".join(p for p in (f"## {title}", note, body) if p)
                       for title, note, body in sections if body)
    return text + "\n" if text else ""
