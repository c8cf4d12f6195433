"""Writing results and hashing files, one way for the whole package.

* Atomic: every file is written to a temp file in the same folder and renamed over the target, so a
  reader (or a resumed run after a crash) sees the old file or the new one, never a torn one.
* One NaN policy for JSON: NaN and +-inf are written as ``null`` (strict JSON that every reader accepts);
  readers treat ``null`` as a missing value. numpy scalars and arrays are written as numbers and lists.
* sha256 of files, streamed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from typing import IO, Iterator


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


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
