"""Writing results and hashing files, one way for the whole package.

* Atomic: every file is written to a temp file in the same folder and renamed over the target, so a
  reader (or a resumed run after a crash) sees the old file or the new one, never a torn one.
* One NaN policy for JSON: NaN and +-inf are written as ``null`` (strict JSON that every reader accepts);
  readers treat ``null`` as a missing value. numpy scalars and arrays are written as numbers and lists.
* sha256 of files, streamed.
* Reading JSON and YAML a user hands over: plain data only (no YAML tag builds a Python object), bounded
  nesting, and errors that name the file and line (:class:`~steel_fsd.utils.cli.UserError`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import yaml

from .errors import UserError

#: Deepest nesting accepted in a JSON or YAML file a user hands over (ours are at most 6 deep).
MAX_NESTING = 64


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on success it replaces ``path``, on error it is removed.
    Parent folders are created. The file gets the permissions a plain ``open`` would give (0666 minus the
    umask), not the temp file's private 0600."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def to_json_value(obj):
    """``obj`` with NaN/inf as None, numpy scalars/arrays as Python numbers/lists, tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_value(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy / torch scalars and arrays
        return to_json_value(obj.tolist())
    return obj


def dumps_json(obj, *, indent: int | None = 1, sort_keys: bool = True, compact: bool = False) -> str:
    """Strict JSON text (the NaN policy above) with a trailing newline; ``compact`` drops all spaces."""
    text = json.dumps(to_json_value(obj), indent=None if compact else indent, sort_keys=sort_keys,
                      separators=(",", ":") if compact else None, allow_nan=False, ensure_ascii=True)
    return text + "\n"


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 1, sort_keys: bool = True,
               compact: bool = False) -> None:
    """Write ``obj`` as strict JSON (see :func:`dumps_json`), atomically."""
    text = dumps_json(obj, indent=indent, sort_keys=sort_keys, compact=compact)
    with atomic_open(path) as f:
        f.write(text)


def write_csv(path: str | os.PathLike, header: list[str], rows: list[list]) -> None:
    """A CSV file with a header row, written atomically."""
    import csv

    with atomic_open(path) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically: a symlink at ``path`` is replaced, never followed; a full disk leaves the old
    file (or none), never a partial one."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> str:
    """A Matplotlib figure saved atomically (format from the extension, e.g. PNG)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png", **savefig_kwargs)
    write_bytes(path, buf.getvalue())
    return os.fspath(path)


def write_image(path: str | os.PathLike, image_bgr) -> None:
    """An HxWx3 BGR (or HxW gray) uint8 image, encoded by the extension (``.png``, ``.jpg``), written atomically."""
    import cv2

    ok, data = cv2.imencode(os.path.splitext(os.fspath(path))[1] or ".png", image_bgr)
    if not ok:
        raise OSError(f"cannot encode an image for {path}")
    write_bytes(path, data.tobytes())


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _depth(obj) -> int:
    """Nesting depth of lists / dicts, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, d)
            if d <= MAX_NESTING:
                stack.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _read_text(path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text", "", f"give a {what}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({e.strerror})", "", "check the path") from None


def _check_nesting(obj, path, what: str):
    if _depth(obj) > MAX_NESTING:
        raise UserError(f"{what} {path} is nested more than {MAX_NESTING} levels deep", "", f"give a {what}")
    return obj


def _parse(path, what: str, parse, describe):
    """``parse`` the text of ``path``; a parse error becomes ``describe(error)`` (a :class:`UserError`), too deep a
    nesting the same error for every format."""
    text = _read_text(path, what)
    try:
        obj = parse(text)
    except RecursionError:
        raise UserError(f"{what} {path} is nested more than {MAX_NESTING} levels deep", "", f"give a {what}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise describe(e) from None
    return _check_nesting(obj, path, what)


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """The JSON value in ``path``. Unreadable, not JSON (with the line), or nested more than
    :data:`MAX_NESTING` deep: :class:`UserError` naming ``what`` and the file."""
    return _parse(path, what, json.loads, lambda e: UserError(
        f"{what} {path} is not valid JSON ({e.msg})", f"at {path}:{e.lineno}", f"give a {what}"))


def yaml_error(e: yaml.YAMLError, what: str, path) -> UserError:
    """A YAML parse error (or a refused ``!!python`` tag) as a :class:`UserError` naming ``path`` and the line."""
    mark = getattr(e, "problem_mark", None)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    tag = isinstance(e, yaml.constructor.ConstructorError)
    return UserError(f"{what} {'YAML tag refused' if tag else 'is not valid YAML'} ({problem})",
                     f"at {path}:{mark.line + 1}" if mark is not None else f"in {path}",
                     "YAML files hold plain values only (numbers, strings, lists, mappings)")


def read_yaml(path: str | os.PathLike, what: str = "YAML file"):
    """The YAML document in ``path`` as plain data (safe loader: a ``!!python`` tag is refused, never run).
    Errors name the file and line (:class:`UserError`)."""
    return _parse(path, what, yaml.safe_load, lambda e: yaml_error(e, what, path))
