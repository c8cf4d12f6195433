"""The protocol file: its settings, datasets, models, methods (with their adaptation), shots, seeds, method
order and paired comparisons, parsed and validated (errors name the file)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from detectron2.data import MetadataCatalog

from ...data.catalog import require_registered
from ...utils.errors import UserError
from ...utils.io import read_yaml
from .methods import ADAPTERS, adapter_names

KINDS = ("base_novel", "cross", "kshot")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One protocol setting; ``source``/``target`` are dataset keys of the protocol file."""

    kind: str
    source: str
    target: str
    novel: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """A readable label (also the cells' folder name); never parsed."""
        if self.kind == "base_novel":
            return f"base_novel_{self.source}_novel-{'+'.join(self.novel)}"
        return f"cross_{self.source}-{self.target}" if self.kind == "cross" else f"kshot_{self.target}"

    @staticmethod
    def parse(spec: dict, datasets: dict) -> "Setting":
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"setting {spec}: kind must be one of {KINDS}")
        src = spec.get("source", spec.get("dataset"))
        tgt = spec.get("target", spec.get("dataset"))
        for key in (src, tgt):
            if key not in datasets:
                raise ValueError(f"setting {spec}: dataset {key!r} is not in DATASETS {sorted(datasets)}")
        novel = spec.get("novel", ())
        if not isinstance(novel, (list, tuple)) or any(
                not isinstance(n, str) or not n.strip() or n in (".", "..") or "/" in n or "\\" in n for n in novel):
            raise UserError(f"setting {spec}: novel must list class names (no path separators)", "in the protocol file",
                            "name classes of the source dataset, e.g. novel: [crazing, scratches]")
        if kind == "base_novel" and not novel:
            raise UserError(f"setting {spec}: a base_novel setting needs novel classes", "in the protocol file",
                            "add novel: [...]")
        return Setting(kind, src, tgt, tuple(novel))


def load_protocol_file(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The protocol file's top-level keys; with ``_BASE_: other.yaml`` (relative to the file, as in Detectron2
    configs) the other file's keys first, each replaced whole by the same key here."""
    given, path = path, path.resolve()
    if path in _seen:
        raise UserError(f"protocol file {path}: _BASE_ cycle {' -> '.join(map(str, _seen + (path,)))}", "",
                        "remove the _BASE_ that points back")
    if not path.is_file():
        raise UserError(f"protocol file {given} not found" + (f" (a _BASE_ of {_seen[-1]})" if _seen else ""), "",
                        "give one of configs/protocols/*.yaml")
    spec = read_yaml(path, "protocol file")
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a protocol file is a mapping of keys (DATASETS, MODELS, ...), got {type(spec).__name__}")
    base = spec.pop("_BASE_", None)
    return {**load_protocol_file(path.parent / base, _seen + (path,)), **spec} if base else spec


class ProtocolSpec:
    """A parsed, validated protocol file (see :mod:`steel_fsd.fewshot.protocol`); :class:`Protocol` runs it."""

    def __init__(self, path: str | os.PathLike, out_dir: str | None = None, shots: list[int] | None = None,
                 seeds: list[int] | None = None, methods: list[str] | None = None):
        self.path = Path(path)
        spec = load_protocol_file(self.path)
        missing = [k for k in ("DATASETS", "MODELS", "METHODS", "SETTINGS") if k not in spec]
        if missing:
            raise ValueError(f"{self.path}: missing keys {missing}")
        self.datasets: dict[str, dict] = spec["DATASETS"]
        self.models: dict[str, str] = spec["MODELS"]
        unknown = sorted(set(methods or []) - set(spec["METHODS"]))
        if unknown:
            raise UserError(f"methods {unknown} are not in the protocol file", str(self.path),
                            f"choose from {sorted(spec['METHODS'])}")
        self.methods: dict[str, dict] = {m: spec["METHODS"][m] for m in (methods or spec["METHODS"])}
        self.method_order = list(spec["METHODS"])  # tables and plots list methods in the file's order
        self.pairs = [tuple(p) for p in spec.get("PAIRED", [])]  # seed-paired comparisons a - b in the report
        if any(len(p) != 2 or not all(isinstance(m, str) for m in p) for p in self.pairs):
            raise ValueError(f"{self.path}: PAIRED must list [method_a, method_b] pairs, got {spec['PAIRED']}")
        for name, m in self.methods.items():
            if m.get("model") not in self.models or m.get("adapt") not in ADAPTERS:
                raise ValueError(f"{self.path}: method {name}: needs model (one of {sorted(self.models)}) and "
                                 f"adapt (one of {adapter_names()}), got {m}")
        self.settings = [Setting.parse(s, self.datasets) for s in spec["SETTINGS"]]
        self.variants: dict[str, dict] = spec.get("VARIANTS", {})
        for kind, rows in self.variants.items():
            for row, v in rows.items():
                if v.get("model") not in self.models or v.get("dataset") not in self.datasets:
                    raise ValueError(f"{self.path}: VARIANTS {kind} {row!r}: needs model (one of {sorted(self.models)}) "
                                     f"and dataset (one of {sorted(self.datasets)}), got {v}")
        self.shots = list(shots or spec.get("SHOTS", [1, 5, 10]))
        self.seeds = list(seeds if seeds is not None else spec.get("SEEDS", [0, 1, 2]))
        self.out = Path(out_dir or spec.get("OUTPUT_DIR", "output/fewshot"))
        # MODELS_DIR: where trained models are kept (default OUTPUT_DIR/models); a run of the same protocol
        # evaluated on another split (e.g. validation, to choose settings) names the first run's to reuse them
        self.models_dir = Path(spec["MODELS_DIR"]) if spec.get("MODELS_DIR") else self.out / "models"
        self.base_opts = [str(v) for v in spec.get("BASE_OPTS", [])]
        self.finetune_opts = [str(v) for v in spec.get("FINETUNE_OPTS", [])]
        self.kshot_opts = [str(v) for v in spec.get("KSHOT_OPTS", [])]
        # PRETRAINED: {model: backbone weights} (tools/pretrain_backbone.py or convert_torchvision.py), used as
        # MODEL.WEIGHTS whenever that model trains (base and K-shot training); the file has to exist only then
        # (see pretrained_weights), so --list and --report-only work without it
        # BASE_OBJECTNESS: [dataset keys]: their training splits' boxes train the base models' RPN only
        # (objectness views, steel_fsd/data/objectness.py); a setting's own source and target are never used
        self.base_objectness = [str(k) for k in spec.get("BASE_OBJECTNESS", [])]
        unknown = sorted(set(self.base_objectness) - set(self.datasets))
        if unknown:
            raise ValueError(f"{self.path}: BASE_OBJECTNESS {unknown} are not DATASETS keys ({sorted(self.datasets)})")
        self.pretrained: dict[str, str] = {str(m): str(w) for m, w in (spec.get("PRETRAINED") or {}).items()}
        for m in self.pretrained:
            if m not in self.models:
                raise ValueError(f"{self.path}: PRETRAINED names model {m!r}, not one of {sorted(self.models)}")

    def pretrained_weights(self, model: str) -> str | None:
        """The PRETRAINED backbone file of ``model`` (None if it has none); :class:`UserError` if it is missing."""
        w = self.pretrained.get(model)
        if w is not None and not os.path.isfile(w):
            raise UserError(f"PRETRAINED {model}: weights file {w} not found", str(self.path),
                            "make it with tools/pretrain_backbone.py (or tools/convert_torchvision.py) first")
        return w

    # ----- datasets -----------------------------------------------------------------------------
    def split(self, key: str, part: str) -> str:
        name = self.datasets[key][part]
        require_registered(name, f"{self.path} DATASETS.{key}.{part}")
        return name

    def classes(self, key: str) -> list[str]:
        return list(MetadataCatalog.get(self.split(key, "train")).thing_classes)

    def check_classes(self, settings: list[Setting]) -> None:
        """Before any training: every novel class of a base/novel setting is a class of its dataset, and at
        least one base class is left (:class:`UserError` naming the setting and the dataset's classes)."""
        for s in settings:
            if s.kind != "base_novel":
                continue
            classes = self.classes(s.source)
            unknown = [n for n in s.novel if n not in classes]
            if unknown or len(set(s.novel)) >= len(classes):
                raise UserError(f"setting {s.name}: novel classes {unknown or list(s.novel)} "
                                + ("are not classes of" if unknown else "leave no base class in")
                                + f" {self.split(s.source, 'train')}", str(self.path), f"choose among {classes}")

    # ----- everything -----------------------------------------------------------------------------
    def cells(self, only: list[Setting] | None = None) -> list[tuple]:
        """Every (setting, method, K, seed) to run, in order."""
        out = []
        for s in only or self.settings:
            out += [(s, method, k, seed) for method in self.methods for k in self.shots for seed in self.seeds]
        return out

    def select(self, kinds: list[str] | None = None, cross: list[str] | None = None,
               only: list[str] | None = None) -> list[Setting]:
        """The settings of the given kinds, cross directions (``SRC->TGT``) or names (all when none is given)."""
        if only:
            names = {s.name: s for s in self.settings}
            if set(only) - set(names):
                raise UserError(f"--only {sorted(set(only) - set(names))}: no such setting", str(self.path),
                                f"choose from {sorted(names)} (--list prints them)")
            return [names[n] for n in only]
        chosen = [s for s in self.settings if (cross and s.kind == "cross" and f"{s.source}->{s.target}" in cross)
                  or (kinds and s.kind in kinds)]
        if cross:
            known = {f"{s.source}->{s.target}" for s in self.settings if s.kind == "cross"}
            unknown = sorted(set(cross) - known)
            if unknown:
                raise UserError(f"--cross {unknown}: no such cross setting", str(self.path), f"choose from {sorted(known)}")
        return chosen if (kinds or cross) else list(self.settings)
