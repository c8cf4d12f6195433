"""The package's layering rule, read from the import statements of every module (not from a list kept by hand):

* ``steel_fsd.data`` (formats -> dataset dicts, splits, support, augmentation) never imports modeling,
  engine or evaluation;
* ``steel_fsd.modeling`` (registered components, prototype files) never imports data or engine;
* neither imports the command-line module ``steel_fsd.utils.cli`` (errors come from ``steel_fsd.utils.errors``);
* no package module imports a tool (``tools/``) or a benchmark.
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "steel_fsd"
FORBIDDEN = {"data": ("steel_fsd.modeling", "steel_fsd.engine", "steel_fsd.evaluation", "steel_fsd.utils.cli"),
             "modeling": ("steel_fsd.data", "steel_fsd.engine", "steel_fsd.utils.cli")}
NEVER = ("tools", "benchmarks", "_path")


def imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of every module ``source`` (a module of ``package``) imports, relative imports
    resolved, at any nesting level (imports inside functions count)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import engine` imports steel_fsd.engine
    return out


def violations(source: str, module: str) -> list[str]:
    """The imports of ``source`` (the module named ``module``, e.g. ``steel_fsd.data.neu``) that break the rule."""
    names = imported_modules(source, module.rsplit(".", 1)[0])
    layer = module.split(".")[1] if module.count(".") > 1 else ""
    bad = [n for n in names for f in FORBIDDEN.get(layer, ()) if n == f or n.startswith(f + ".")]
    return sorted(bad + [n for n in names if n.split(".")[0] in NEVER])


def test_rule_reader_finds_violations():
    """The checker itself: relative imports of every depth, imports inside functions, tools."""
    src = ("from ..engine import trainer\nfrom .neu import load_neu_voc\nimport os\n"
           "def f():\n    from ..modeling.prototypes import PrototypeSet\n    import tools.demo\n")
    assert violations(src, "steel_fsd.data.x") == ["steel_fsd.engine", "steel_fsd.engine.trainer",
                                                     "steel_fsd.modeling.prototypes",
                                                     "steel_fsd.modeling.prototypes.PrototypeSet", "tools.demo"]
    assert violations("from ... import data\nfrom ...data.mapper import M\nfrom ..data import y\n", "steel_fsd.modeling.sub.y") == \
        ["steel_fsd.data", "steel_fsd.data.mapper", "steel_fsd.data.mapper.M"]
    assert violations(src.replace("..engine", "..utils").replace("..modeling.prototypes", "..utils.io")
                      .replace("import tools.demo", "pass"), "steel_fsd.data.x") == []


MODULES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_layering(path):
    module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    bad = violations(path.read_text(), module)
    assert not bad, f"steel_fsd/{path.relative_to(PKG)} imports {bad} (layering rule, see tests/test_layering.py)"
