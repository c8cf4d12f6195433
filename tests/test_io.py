"""steel_fsd.utils.io: atomic writes, the one NaN policy, file hashing."""
import hashlib
import json
import math

import numpy as np
import pytest

from steel_fsd.utils.io import atomic_open, dumps_json, file_sha256, write_json


def test_nan_policy_and_numpy_values(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"b": float("nan"), "a": [np.float32(1.5), float("inf"), -math.inf], "c": np.arange(3),
                      "t": (1, np.int64(2))})
    text = path.read_text()
    assert json.loads(text) == {"a": [1.5, None, None], "b": None, "c": [0, 1, 2], "t": [1, 2]}
    assert "NaN" not in text and "Infinity" not in text and text.endswith("\n")
    assert text.index('"a"') < text.index('"b"')  # sorted keys by default
    assert dumps_json({"b": 1, "a": 2}, compact=True, sort_keys=False) == '{"b":1,"a":2}\n'


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})  # not JSON: nothing is replaced
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("partial")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temp files left behind


def test_file_sha256_matches_hashlib(tmp_path):
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # several read chunks
    (tmp_path / "b").write_bytes(data)
    assert file_sha256(tmp_path / "b") == hashlib.sha256(data).hexdigest()


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    import os

    from steel_fsd.utils.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "r.json") == mode(tmp_path / "plain.txt") == 0o644
