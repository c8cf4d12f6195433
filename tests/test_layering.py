"""The package's layering rule, read from the import statements of every module (not from a list kept by hand):

* ``steel_fsd.data`` (formats -> dataset dicts, splits, augmentation) and ``steel_fsd.fewshot.support``
  (support sampling, K-shot manifests) never import modeling, engine, evaluation, inference or the rest of
  fewshot;
* ``steel_fsd.modeling`` (registered components, checkpoints) and ``steel_fsd.fewshot.prototypes`` (prototype
  files, attaching them to a model) never import data, engine, inference or the rest of fewshot;
* ``steel_fsd.evaluation`` never imports engine, fewshot or inference;
* ``steel_fsd.engine`` (training, model loading) never imports inference or fewshot beyond its prototype files;
* ``steel_fsd.fewshot`` (adaptation, the protocol) never imports inference;
* none of these imports the command-line module ``steel_fsd.utils.cli`` (errors come from
  ``steel_fsd.utils.errors``), except engine's set-up of a run;
* no package module imports a tool (``tools/``) or a benchmark.
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "steel_fsd"
_LOW = ("steel_fsd.engine", "steel_fsd.inference", "steel_fsd.fewshot.adapt", "steel_fsd.fewshot.protocol",
        "steel_fsd.utils.cli")
# module prefix -> forbidden import prefixes; the longest prefix that names a module decides
FORBIDDEN = {"steel_fsd.data": _LOW + ("steel_fsd.modeling", "steel_fsd.evaluation", "steel_fsd.fewshot"),
             "steel_fsd.fewshot.support": _LOW + ("steel_fsd.modeling", "steel_fsd.evaluation",
                                                   "steel_fsd.fewshot.prototypes"),
             "steel_fsd.modeling": _LOW + ("steel_fsd.data", "steel_fsd.fewshot"),
             "steel_fsd.fewshot.prototypes": _LOW + ("steel_fsd.data", "steel_fsd.fewshot.support"),
             "steel_fsd.evaluation": ("steel_fsd.engine", "steel_fsd.fewshot", "steel_fsd.inference",
                                      "steel_fsd.utils.cli"),
             "steel_fsd.engine": ("steel_fsd.inference", "steel_fsd.fewshot.adapt", "steel_fsd.fewshot.protocol",
                                  "steel_fsd.fewshot.support"),
             "steel_fsd.fewshot": ("steel_fsd.inference", "steel_fsd.utils.cli")}
NEVER = ("tools", "benchmarks", "_path")


def rule_for(module: str) -> tuple[str, ...]:
    keys = [k for k in FORBIDDEN if module == k or module.startswith(k + ".")]
    return FORBIDDEN[max(keys, key=len)] if keys else ()


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
    bad = [n for n in names for f in rule_for(module) if n == f or n.startswith(f + ".")]
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
    # the most specific rule decides: the protocol may import engine, the prototype files may not
    assert violations("from ...engine.trainer import Trainer\n", "steel_fsd.fewshot.protocol.runner") == []
    assert violations("from ..engine.trainer import Trainer\n", "steel_fsd.fewshot.prototypes") == \
        ["steel_fsd.engine.trainer", "steel_fsd.engine.trainer.Trainer"]
    assert violations("from ..inference.predict import Predictor\n", "steel_fsd.engine.x") == \
        ["steel_fsd.inference.predict", "steel_fsd.inference.predict.Predictor"]


MODULES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_layering(path):
    module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    bad = violations(path.read_text(), module)
    assert not bad, f"steel_fsd/{path.relative_to(PKG)} imports {bad} (layering rule, see tests/test_layering.py)"
