from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from steel_fsd.data.splits import (NEGATIVE, SPLITS, largest_remainder, sha256_files, split_manifest,
                                   stratified_kfold, stratified_split, stratum_keys, verify_manifest)

NEU_ROOT = Path("/work/shared/data/neu-det")


def make_dicts(n: int = 300, num_classes: int = 5, seed: int = 123) -> list[dict]:
    """Synthetic dicts: skewed class frequencies, multi-class images and ~10% negatives."""
    rng = np.random.default_rng(seed)
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.1])[:num_classes]
    out = []
    for i in range(n):
        k = 0 if rng.random() < 0.1 else int(rng.integers(1, 4))
        anns = [{"bbox": [1.0, 2.0, 10.0, 20.0], "bbox_mode": 0, "iscrowd": 0,
                 "category_id": int(rng.choice(num_classes, p=probs / probs.sum()))} for _ in range(k)]
        out.append({"file_name": f"/x/img_{i:04d}.png", "image_id": i + 1, "image_key": f"img_{i:04d}",
                    "height": 32, "width": 32, "annotations": anns})
    return out


def keys(splits: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {s: [d["image_key"] for d in v] for s, v in splits.items()}


def brute_force_strata(dicts: list[dict]) -> dict[str, int]:
    freq = Counter()
    for d in dicts:
        for c in set(a["category_id"] for a in d["annotations"]):
            freq[c] += 1
    out = {}
    for d in dicts:
        cls = sorted(set(a["category_id"] for a in d["annotations"]))
        best = NEGATIVE
        for c in cls:  # explicit scan: fewest images, then lowest id
            if best == NEGATIVE or freq[c] < freq[best]:
                best = c
        out[d["image_key"]] = best
    return out


def test_deterministic_and_order_independent():
    dicts = make_dicts()
    a = keys(stratified_split(dicts, seed=7))
    shuffled = dicts[:]
    random.Random(1).shuffle(shuffled)
    np.random.seed(99)  # the global RNG must not matter
    assert keys(stratified_split(shuffled, seed=7)) == a
    assert keys(stratified_split(dicts, seed=7)) == a
    assert keys(stratified_split(dicts, seed=8)) != a
    for s in SPLITS:
        assert a[s] == sorted(a[s])


def test_partition_and_per_stratum_ratios():
    dicts = make_dicts()
    ratios = (0.7, 0.15, 0.15)
    splits = stratified_split(dicts, seed=3, ratios=ratios)
    all_keys = [k for v in keys(splits).values() for k in v]
    assert sorted(all_keys) == sorted(d["image_key"] for d in dicts)  # every image exactly once
    strata = brute_force_strata(dicts)
    assert stratum_keys(dicts) == strata
    assert NEGATIVE in strata.values()
    sizes = Counter(strata.values())
    for k, n in sizes.items():
        for s, r in zip(SPLITS, ratios):
            got = sum(1 for d in splits[s] if strata[d["image_key"]] == k)
            assert abs(got - n * r) < 1, (k, s, got, n * r)


def test_kfold_test_splits_partition_the_data_and_each_fold_is_stratified():
    dicts = make_dicts()
    strata = brute_force_strata(dicts)
    sizes = Counter(strata.values())
    tests = []
    for fold in range(3):
        sp = stratified_kfold(dicts, 3, fold, seed=5)
        k = keys(sp)
        assert sorted(k["train"] + k["val"] + k["test"]) == sorted(d["image_key"] for d in dicts)  # a partition
        tests += k["test"]
        for stratum, n in sizes.items():
            got = {s: sum(strata[x] == stratum for x in k[s]) for s in SPLITS}
            assert abs(got["test"] - n / 3) < 1, (fold, stratum, got)
            assert abs(got["val"] - (n - got["test"]) * 0.15) < 1, (fold, stratum, got)
    assert sorted(tests) == sorted(d["image_key"] for d in dicts)  # every image is tested exactly once
    assert keys(stratified_kfold(list(reversed(dicts)), 3, 1, seed=5)) == keys(stratified_kfold(dicts, 3, 1, seed=5))
    assert keys(stratified_kfold(dicts, 3, 1, seed=6)) != keys(stratified_kfold(dicts, 3, 1, seed=5))
    for bad in ((1, 0), (3, 3), (3, -1)):
        with pytest.raises(ValueError, match="fold"):
            stratified_kfold(dicts, *bad)


def test_rarest_class_is_the_stratum():
    # class 1 is in 1 image, class 0 in 3: the mixed image must be stratified by class 1
    mk = lambda key, cls: {"image_key": key, "image_id": 0, "annotations": [{"category_id": c} for c in cls]}
    dicts = [mk("a", [0]), mk("b", [0]), mk("c", [0, 1, 1]), mk("d", [])]
    assert stratum_keys(dicts) == {"a": 0, "b": 0, "c": 1, "d": NEGATIVE}
    tie = [mk("a", [2, 1]), mk("b", [2]), mk("c", [1])]  # equal frequency: lower id wins
    assert stratum_keys(tie)["a"] == 1


@pytest.mark.parametrize("ratios", [(0.7, 0.15, 0.15), (0.5, 0.3, 0.2), (1, 0, 0), (3, 1, 1)])
def test_largest_remainder(ratios):
    r = np.asarray(ratios, float) / sum(ratios)
    for n in range(0, 60):
        counts = largest_remainder(n, ratios)
        assert sum(counts) == n
        assert all(abs(c - n * x) < 1 for c, x in zip(counts, r))
        # brute force: no apportionment summing to n has smaller squared deviation from the exact shares
        best = min(sum((c - n * x) ** 2 for c, x in zip((a, b, n - a - b), r))
                   for a in range(n + 1) for b in range(n + 1 - a))
        assert sum((c - n * x) ** 2 for c, x in zip(counts, r)) <= best + 1e-9


def test_bad_inputs():
    dicts = make_dicts(10)
    with pytest.raises(ValueError, match="duplicate image_key"):
        stratified_split(dicts + [dict(dicts[0])])
    with pytest.raises(ValueError, match="ratios"):
        stratified_split(dicts, ratios=(0.7, 0.3))
    with pytest.raises(ValueError, match="ratios"):
        stratified_split(dicts, ratios=(0.7, -0.1, 0.4))


def test_sha256_files(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    for name, text in [("x.xml", "1"), ("y.xml", "2"), ("sub/z.xml", "3")]:
        (a / name).parent.mkdir(exist_ok=True)
        (a / name).write_text(text)
    files = sorted(a.rglob("*.xml"))
    d = sha256_files(files)
    assert d["files"] == 3
    assert sha256_files(files[::-1]) == d
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert sha256_files(sorted(b.rglob("*.xml"))) == d  # location does not matter
    (b / "y.xml").write_text("changed")
    assert sha256_files(sorted(b.rglob("*.xml")))["sha256"] != d["sha256"]
    (b / "y.xml").write_text("2")
    (b / "y.xml").rename(b / "w.xml")
    assert sha256_files(sorted(b.rglob("*.xml")))["sha256"] != d["sha256"]


def test_manifest_round_trip_and_tampering(tmp_path):
    dicts = make_dicts()
    src = tmp_path / "ann.csv"
    src.write_text("some annotations")
    names = ["c0", "c1", "c2", "c3", "c4"]
    splits = stratified_split(dicts, seed=5)
    m = json.loads(json.dumps(split_manifest(splits, 5, [src], (0.7, 0.15, 0.15), names)))
    assert m["seed"] == 5 and m["sources"]["files"] == 1
    for s in SPLITS:
        part = m["splits"][s]
        assert part["image_keys"] == [d["image_key"] for d in splits[s]]
        assert part["images"] == len(splits[s])
        assert part["boxes"] == sum(len(d["annotations"]) for d in splits[s])
        for c, name in enumerate(names):
            assert part["class_boxes"][name] == sum(a["category_id"] == c for d in splits[s] for a in d["annotations"])
            assert part["class_images"][name] == sum(any(a["category_id"] == c for a in d["annotations"])
                                                     for d in splits[s])
    verify_manifest(m, list(reversed(dicts)), sources=[src])

    tampered = json.loads(json.dumps(m))
    moved = tampered["splits"]["train"]["image_keys"].pop(0)
    tampered["splits"]["val"]["image_keys"] = sorted(tampered["splits"]["val"]["image_keys"] + [moved])
    with pytest.raises(ValueError, match=f"split 'train'.*{moved}"):
        verify_manifest(tampered, dicts)

    other_seed = dict(m, seed=6)
    with pytest.raises(ValueError, match="differs from the manifest"):
        verify_manifest(other_seed, dicts)

    relabeled = [dict(d, annotations=[dict(a, category_id=(a["category_id"] + 1) % 5) for a in d["annotations"]])
                 for d in dicts]
    with pytest.raises(ValueError):
        verify_manifest(m, relabeled)

    src.write_text("edited annotations")
    with pytest.raises(ValueError, match="sources differ"):
        verify_manifest(m, dicts, sources=[src])


def test_real_neu_class_balance():
    neu = pytest.importorskip("steel_fsd.data.neu")
    if not NEU_ROOT.is_dir():
        pytest.skip("real NEU sample not available")
    dicts = neu.load_neu_voc(str(NEU_ROOT))
    splits = stratified_split(dicts, seed=0)
    assert sum(len(v) for v in splits.values()) == len(dicts)
    total = Counter(c for d in dicts for c in {a["category_id"] for a in d["annotations"]})
    assert len(total) == len(neu.NEU_CLASSES)
    for s, target in zip(SPLITS, (0.7, 0.15, 0.15)):
        assert abs(len(splits[s]) / len(dicts) - target) < 0.005
        got = Counter(c for d in splits[s] for c in {a["category_id"] for a in d["annotations"]})
        for c in total:
            assert abs(got[c] / total[c] - target) < 0.03, (neu.NEU_CLASSES[c], s, got[c], total[c])
