"""Weights files: read without running code from them, written atomically, resumed past a torn file.

Detectron2 reads ``.pkl`` model-zoo files with plain ``pickle.load``, so a weights file passed between
sites could run any code on load. Here every weights file goes through :func:`read_weights_file`:

* ``.pkl`` (Detectron2 model zoo, Caffe2/Detectron1): a restricted unpickler admits only what those
  files hold (dicts, lists, tuples, numbers, strings, bytes, numpy arrays, dtypes and scalars);
* anything else (``.pth``): ``torch.load(weights_only=True)`` (tensors, plain containers, numbers,
  strings), never retried without it.

Anything else in the file is refused with :class:`UnsafeWeightsError` naming the file and the object;
a truncated or corrupt file raises :class:`WeightsReadError`. :class:`SafeCheckpointer` is Detectron2's
``DetectionCheckpointer`` with that reader, atomic saves (temp file + rename, for the checkpoint and for
``last_checkpoint``), the class names the model was trained on stored in each checkpoint
(``steel_fsd.thing_classes``), the incompatible keys of the last load kept for checks, and a resume that
falls back to the newest readable ``model_*.pth`` when ``last_checkpoint`` names a torn file. Weights too large
for one file where files are size-limited are written in pieces by :func:`save_sharded`; the small index file it
writes at the given path is read like any weights file (the pieces are joined).
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.io import atomic_open, file_sha256

logger = logging.getLogger("steel_fsd")

META_KEY = "steel_fsd"  # {"thing_classes": [...], "train_tile": 0 | 256 | ...} in checkpoints written by steel-fsd

# (module, name) pairs a model-zoo .pkl may reference: numpy array/scalar reconstruction and the codecs
# helper that protocol-2 pickles use for bytes. numpy >= 2 moved ``numpy.core`` to ``numpy._core``.
_NUMPY_GLOBALS = {("multiarray", "_reconstruct"), ("multiarray", "scalar")}
_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict"),
            ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set")}


class UnsafeWeightsError(ValueError):
    """A weights file holds an object that only code execution could rebuild: it is refused."""


class WeightsReadError(ValueError):
    """A weights file that cannot be read (missing, truncated, corrupt)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a model-zoo ``.pkl`` needs."""

    def find_class(self, module: str, name: str):
        parts = module.split(".")
        if parts[0] == "numpy" and (parts[-1], name) in _NUMPY_GLOBALS and len(parts) == 3 \
                and parts[1] in ("core", "_core"):
            import numpy as np
            module = "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core.multiarray"
        elif (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        elif module == "__builtin__":
            module = "builtins"
        return super().find_class(module, name)


def _zoo_format(data: dict) -> dict:
    """A ``.pkl`` payload in the form Detectron2's checkpointer loads: model-zoo files as they are,
    Caffe2/Detectron1 blobs as ``{"model": ..., "__author__": "Caffe2", "matching_heuristics": True}``."""
    if "model" in data and "__author__" in data:
        return data
    if "blobs" in data:
        data = data["blobs"]
    return {"model": {k: v for k, v in data.items() if not k.endswith("_momentum")}, "__author__": "Caffe2",
            "matching_heuristics": True}


def is_torch_save_file(path: str) -> bool:
    """Whether ``path`` starts as ``torch.save`` writes (a zip archive, or a legacy pickle)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def read_weights_file(path: str, _piece: bool = False) -> dict:
    """The payload of a weights file, read without running code from it (see the module docstring).

    ``.pkl`` payloads are returned in Detectron2's zoo form (:func:`_zoo_format`). Raises
    :class:`UnsafeWeightsError` or :class:`WeightsReadError`, each naming ``path``.
    """
    if not os.path.isfile(path):
        raise WeightsReadError(f"{path}: weights file not found")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = _RestrictedUnpickler(f, encoding="latin1").load()
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise UnsafeWeightsError(
                f"{path}: refused: it pickles {found.group(1)}, which a weights file does not need and which could "
                "run code when loaded; only dicts, lists, numbers, strings, tensors and numpy arrays are read. "
                "Re-save the weights from a trusted source as a plain state dict") from None
        if not is_torch_save_file(path):
            raise WeightsReadError(f"{path}: not a weights file (expected a .pth written by torch.save or a "
                                   "Detectron2 .pkl)") from None
        raise WeightsReadError(f"{path}: not a readable weights file ({_first_line(e)})") from None
    except (EOFError, RuntimeError, OSError, zipfile.BadZipFile, ValueError, AttributeError, TypeError,
            IndexError, KeyError) as e:
        raise WeightsReadError(f"{path}: truncated or corrupt weights file ({type(e).__name__}: "
                               f"{_first_line(e)})") from None
    if not isinstance(data, dict):
        raise WeightsReadError(f"{path}: holds a {type(data).__name__}, not a dict of weights")
    if SHARDS_KEY in data:
        if _piece:
            raise WeightsReadError(f"{path}: a piece of sharded weights is itself an index")
        return _join_shards(path, data)
    return _zoo_format(data) if path.endswith(".pkl") else data


# an index file: {SHARDS_KEY: [piece file names beside it], "sha256": [their sha256], "tensors": count}
SHARDS_KEY = "steel_fsd.shards"


def save_sharded(weights: dict[str, torch.Tensor], path: str, max_bytes: int) -> list[str]:
    """Write ``{"model": weights}`` as pieces of at most ``max_bytes`` of tensor data each (``<path>.part<i>``,
    whole tensors; one tensor larger than that is a piece of its own) and an index at ``path`` that
    :func:`read_weights_file` reads as the whole. The index holds each piece's sha256 (checked on reading), so the
    index's own hash stands for the whole. Returns the piece file names."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in weights.items():
        n = v.numel() * v.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][k], size = v, size + n
    names = [f"{os.path.basename(path)}.part{i}" for i in range(len(groups))]
    digests = []
    for name, group in zip(names, groups):
        piece = os.path.join(os.path.dirname(path) or ".", name)
        atomic_save({"model": group}, piece)
        digests.append(file_sha256(piece))
    atomic_save({SHARDS_KEY: names, "sha256": digests, "tensors": len(weights)}, path)
    return names


def _join_shards(path: str, index: dict) -> dict:
    names, joined = index[SHARDS_KEY], {}
    digests = index.get("sha256") or [None] * len(names)
    if not isinstance(names, list) or not all(isinstance(n, str) and os.path.basename(n) == n for n in names) \
            or len(digests) != len(names):
        raise WeightsReadError(f"{path}: a weights index must list piece file names in its own folder (and their "
                               "sha256)")
    for name, digest in zip(names, digests):
        piece = os.path.join(os.path.dirname(path) or ".", name)
        if not os.path.isfile(piece):
            raise WeightsReadError(f"{path}: its piece {piece} is missing (copy every {os.path.basename(path)}.part* "
                                   "file beside it)")
        if digest is not None and file_sha256(piece) != digest:
            raise WeightsReadError(f"{path}: its piece {piece} is not the one it was written with (sha256 differs): "
                                   "copy the pieces written with this index")
        joined.update(read_weights_file(piece, _piece=True).get("model", {}))
    if len(joined) != index.get("tensors", len(joined)):
        raise WeightsReadError(f"{path}: its pieces hold {len(joined)} tensors, the index says {index['tensors']}")
    return {"model": joined}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: readers never see a partial file."""
    with atomic_open(path, "wb") as f:
        if isinstance(obj, str):
            f.write(obj.encode())
        else:
            torch.save(obj, f)


def checkpoint_classes(checkpoint: dict) -> list[str] | None:
    """The class names stored in a checkpoint payload by steel-fsd, or None."""
    meta = checkpoint.get(META_KEY)
    return list(meta["thing_classes"]) if isinstance(meta, dict) and meta.get("thing_classes") else None


def checkpoint_train_tile(checkpoint: dict) -> int | None:
    """The tile size the model's training images were cut into (0: whole images), or None when unrecorded."""
    meta = checkpoint.get(META_KEY)
    tile = meta.get("train_tile") if isinstance(meta, dict) else None
    return tile if isinstance(tile, int) and not isinstance(tile, bool) else None


def _iteration(path: str) -> int:
    m = re.fullmatch(r"model_(\d+)\.pth", os.path.basename(path))
    return int(m.group(1)) if m else -1


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` reading with :func:`read_weights_file` and writing atomically.

    ``class_names`` (the training classes) are saved in every checkpoint as ``steel_fsd.thing_classes``, and
    ``train_tile`` (the tile size of the training images, 0 for whole images) as ``steel_fsd.train_tile``;
    ``preread=(path, payload)`` loads ``path`` from a payload the caller has already read;
    after :meth:`load`, ``last_incompatible`` holds the missing/unexpected/shape-mismatched keys and
    ``last_classes`` the stored class names (None for files from elsewhere).
    """

    def __init__(self, model, save_dir: str = "", *, class_names: list[str] | None = None,
                 train_tile: int | None = None, preread: tuple[str, dict] | None = None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.class_names = list(class_names) if class_names else None
        self.train_tile = train_tile
        self.preread = preread  # (path, payload) already read by read_weights_file: not read again
        self.last_incompatible = None
        self.last_classes: list[str] | None = None

    def _load_file(self, filename: str) -> dict:
        if self.preread is not None and filename == self.preread[0]:
            data = dict(self.preread[1])  # loading pops keys: leave the caller's payload whole
        else:
            data = read_weights_file(filename)
        if "model" not in data:
            data = {"model": data}
        self.last_classes = checkpoint_classes(data)
        return data

    def _load_model(self, checkpoint):
        self.last_incompatible = super()._load_model(checkpoint)
        return self.last_incompatible

    def load(self, path, *args, **kwargs):
        self.last_incompatible, self.last_classes = None, None
        if path and not os.path.isfile(path):
            from detectron2.utils.file_io import PathManager
            try:
                local = PathManager.get_local_path(path)
            except Exception as e:  # offline machines, bad URLs
                raise WeightsReadError(f"{path}: cannot be fetched ({type(e).__name__}: {_first_line(e)})") from None
            if not os.path.isfile(local):
                raise WeightsReadError(f"{path}: weights file not found")
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # Detectron2 after v0.6 sets this in load() and clears it only on success: a refused or torn
            # file would otherwise fail the next load()'s assertion (resume's fallback loads again).
            self._parsed_url_during_load = None

    def save(self, name: str, **kwargs) -> None:
        """Detectron2's checkpoint payload (+ the class names), written atomically, then tagged as last."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()}}
        meta = {"thing_classes": self.class_names} if self.class_names else {}
        if self.train_tile is not None:
            meta["train_tile"] = int(self.train_tile)
        if meta:
            data[META_KEY] = meta
        data.update(kwargs)
        basename = f"{name}.pth"
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info("Saving checkpoint to %s", os.path.join(self.save_dir, basename))
        atomic_save(data, os.path.join(self.save_dir, basename))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_save(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict:
        """As Detectron2's, but a ``last_checkpoint`` naming a missing, truncated or corrupt file is
        skipped with a warning for the newest readable ``model_*.pth`` (then ``model_final.pth``)."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        last = self.get_checkpoint_file()
        others = sorted((p for p in self.get_all_checkpoint_files() if os.path.abspath(p) != os.path.abspath(last)
                         and os.path.basename(p).startswith("model_")), key=_iteration, reverse=True)
        errors = []
        for candidate in [last] + others:
            try:
                ret = self.load(candidate)
            except WeightsReadError as e:
                errors.append(str(e))
                logger.warning("resume: %s; trying the next newest checkpoint", e)
                continue
            if errors:
                logger.warning("resume: continuing from %s (the last_checkpoint file named an unreadable one)",
                               candidate)
            return ret
        raise WeightsReadError(f"{self.save_dir}: no readable checkpoint to resume from ({'; '.join(errors)}); "
                               "remove the folder's last_checkpoint file to start from MODEL.WEIGHTS")


__all__ = ["SafeCheckpointer", "UnsafeWeightsError", "WeightsReadError", "read_weights_file", "atomic_save",
           "checkpoint_classes", "META_KEY"]
