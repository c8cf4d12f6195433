"""The Severstal RLE codec and mask components against brute-force references."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from steel_fsd.data.rle import RLEError, mask_components, parse_rle, rle_decode, rle_encode


def decode_reference(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel loop: pixel k (1-based) is row (k-1) % H, column (k-1) // H."""
    h, w = shape
    mask = np.zeros(shape, bool)
    nums = [int(t) for t in rle.split()]
    for start, length in zip(nums[0::2], nums[1::2]):
        for k in range(start - 1, start - 1 + length):
            mask[k % h, k // h] = True
    return mask


def random_runs(rng: np.random.Generator, n_pixels: int) -> str:
    """Sorted, non-overlapping random runs as an RLE string."""
    cuts = np.sort(rng.choice(np.arange(n_pixels + 1), size=2 * int(rng.integers(1, 8)), replace=False))
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(cuts[0::2], cuts[1::2]))


@pytest.mark.parametrize("seed", range(5))
def test_decode_matches_per_pixel_reference(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(3, 20)), int(rng.integers(3, 30)))
    rle = random_runs(rng, shape[0] * shape[1])
    np.testing.assert_array_equal(rle_decode(rle, shape), decode_reference(rle, shape))


def test_decode_default_shape_is_severstal_column_major():
    mask = rle_decode("1 3 257 1 409600 1")
    assert mask.shape == (256, 1600)
    assert mask[0:3, 0].all() and mask[0, 1] and mask[255, 1599] and mask.sum() == 5


@pytest.mark.parametrize("seed", range(5))
def test_encode_decode_round_trip(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    mask = rng.random(shape) < rng.uniform(0.05, 0.95)
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, shape), mask)
    np.testing.assert_array_equal(decode_reference(rle, shape), mask)
    assert rle_encode(np.zeros(shape, bool)) == "" and not rle_decode("", shape).any()


@pytest.mark.parametrize("rle, match", [
    ("1 2 5", "odd number"),
    ("1 x", "non-integer"),
    ("0 3", "1-indexed"),
    ("5 0", "length"),
    ("101 1", "beyond the image"),
    ("99 5", "ends beyond"),
    ("1 5 3 2", "overlapping"),
    ("20 2 1 2", "unsorted"),
])
def test_parse_errors(rle, match):
    with pytest.raises(RLEError, match=match):
        parse_rle(rle, (10, 10))


@pytest.mark.parametrize("seed", range(6))
def test_components_match_scipy_8_connected(seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((60, 90)) < 0.35) | (rng.random((60, 90)) < 0.02)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    want = sorted((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, int((labels[sl] == i + 1).sum()))
                  for i, sl in enumerate(ndimage.find_objects(labels)))
    comps = mask_components(mask)
    assert len(want) == n
    assert sorted((*map(int, c.bbox), c.area) for c in comps) == want
    for c in comps:
        assert c.polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in c.polygons)
        xs, ys = np.array(c.polygons[0][0::2]), np.array(c.polygons[0][1::2])
        assert xs.min() >= c.bbox[0] and xs.max() <= c.bbox[2] and ys.min() >= c.bbox[1] and ys.max() <= c.bbox[3]
    min_area = 4
    assert sorted(c.area for c in mask_components(mask, min_area)) == sorted(a for *_, a in want if a >= min_area)
