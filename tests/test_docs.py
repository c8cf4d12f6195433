"""Docs that cannot rot: every file, command and results file the README and docs/ name exists, every link
resolves, and every table marked with its results file quotes numbers that file holds."""
import json
import math
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
# repository paths as the docs write them (output/ and user paths like data/plates are examples, not files)
PATH = re.compile(r"(?<![\w./-])((?:configs|tools|benchmarks|docs|datasets|tests|steel_fsd)/[\w./+-]*[\w/])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
MARK = re.compile(r"<!--\s*results:\s*(.+?)\s*-->")
NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:,\d{3})*\.\d+(?![\w.])")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lstrip("#").strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_files_exist(doc):
    text = doc.read_text()
    named = {m.group(1).rstrip(".") for m in PATH.finditer(text)
             if text[m.end():m.end() + 1] not in ("*", "{", "<")}  # a pattern (configs/x_*.yaml), not a file
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            bad.append(target)
        elif anchor and file.suffix == ".md":
            anchors = {_slug(line) for line in file.read_text().splitlines() if line.startswith("#")}
            if anchor not in anchors:
                bad.append(target)
    assert not bad, f"{doc.name}: broken links {bad}"


def _numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)] if math.isfinite(obj) else []
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def _marked_tables(text: str):
    """(results files, table lines) for every table that follows a ``<!-- results: ... -->`` marker."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = MARK.search(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            j += 1
        table = []
        while j < len(lines) and lines[j].startswith("|"):
            table.append(lines[j])
            j += 1
        yield m.group(1).split(), table


def _held(value: str, numbers: list[float], scales=(1.0, 100.0)) -> bool:
    """``value`` (as printed, e.g. "62.9") is one of ``numbers`` (or a fraction of it x100) rounded the same way."""
    decimals = len(value.split(".")[1])
    v = float(value.replace(",", "").replace("−", "-"))
    return any(abs(x * s - v) <= 10 ** -decimals / 2 + 1e-6 for x in numbers for s in scales)  # half-up or half-even


MARKED = [(doc, files, table) for doc in DOCS for files, table in _marked_tables(doc.read_text())]


def test_results_tables_are_marked():
    assert len(MARKED) >= 2  # the README's headline table and the demo table at least


@pytest.mark.parametrize("doc, files, table", MARKED, ids=[f"{d.name}:{' '.join(f)}" for d, f, _ in MARKED])
def test_marked_tables_quote_their_results_files(doc, files, table):
    numbers = []
    for f in files:
        path = REPO / f
        paths = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        assert paths and all(p.is_file() for p in paths), f"{doc.name}: results file {f} not found"
        for p in paths:
            numbers += _numbers(json.loads(p.read_text()))
    wrong = []
    for row in table[2:]:  # header and separator first
        cells = [c.strip() for c in row.strip("|").split("|")][1:]  # the first column names the row
        for cell in cells:
            if "`" in cell:
                continue  # a file or command, not a number
            wrong += [v for v in NUMBER.findall(cell) if not _held(v, numbers)]
    assert not wrong, f"{doc.name}: numbers not in {files}: {wrong}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_make_targets_exist(doc):
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    text = doc.read_text()
    code = "\n".join(re.findall(r"```.*?```", text, re.S) + re.findall(r"`([^`\n]+)`", text))  # commands, not prose
    named = set(re.findall(r"(?:^|\s|`)make ([a-z][\w-]*)", code, re.M))
    assert named <= targets, f"{doc.name}: make targets {sorted(named - targets)} are not in the Makefile"
