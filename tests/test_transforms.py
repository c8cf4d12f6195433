from __future__ import annotations

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import transforms as T

from steel_fsd.config import add_steel_fsd_config
from steel_fsd.data.transforms import (
    CLAHE,
    RandomGamma,
    RandomGaussianNoise,
    build_augmentations,
    build_harmonization,
)


def make_cfg(all_off: bool = False, **aug):
    """Default config; ``all_off`` turns every harmonization/augmentation switch off but RESIZE."""
    cfg = add_steel_fsd_config(get_cfg())
    if all_off:
        cfg.INPUT.HARMONIZE.CLAHE = False
        for key in ("GAMMA", "NOISE", "ROTATION", "HFLIP", "VFLIP", "CROP"):
            cfg.INPUT.AUG[key] = False
    for key, value in aug.items():
        cfg.INPUT.AUG[key] = value
    return cfg


def run(augs, image, boxes=None, seed=0):
    """Apply ``augs`` under ``seed``; return (image, boxes, TransformList)."""
    np.random.seed(seed)
    inp = T.AugInput(image, boxes=None if boxes is None else np.array(boxes, dtype=np.float64))
    tfms = T.AugmentationList(augs)(inp)
    return inp.image, inp.boxes, tfms


def gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A gray 3-channel uint8 image with a gradient plus texture (non-trivial histogram)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    g = 60 + 80 * xx / w + 40 * np.sin(yy / 7.0) + rng.normal(0, 10, (h, w))
    return gray3(np.clip(g, 0, 255).astype(np.uint8))


def find(tfms, cls):
    found = [t for t in tfms.transforms if isinstance(t, cls)]
    return found[0] if found else None


def rotated_box(box, angle_deg, cx, cy):
    """Bounding box of a box's corners rotated counter-clockwise (as displayed, y down) about (cx, cy)."""
    x0, y0, x1, y1 = box
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    xs, ys = np.array([x0, x1, x1, x0]) - cx, np.array([y0, y0, y1, y1]) - cy
    rx, ry = cx + c * xs + s * ys, cy - s * xs + c * ys
    return np.array([rx.min(), ry.min(), rx.max(), ry.max()])


def bright_stats(image: np.ndarray, box: np.ndarray, thresh: int = 128):
    """(fraction of bright pixel centres inside box, tight edge box of bright pixels, bright count)."""
    ys, xs = np.nonzero(image[:, :, 0] > thresh)
    cx, cy = xs + 0.5, ys + 0.5
    inside = (cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3])
    tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
    return inside.mean(), tight, len(xs)


# --- (a) a rendered box follows its defect ---------------------------------------------------

H, W = 150, 200
DEFECT = (80, 60, 125, 90)  # x0, y0, x1, y1: stays inside every 0.8 crop and +-30 deg rotation


def defect_image() -> np.ndarray:
    img = np.zeros((H, W), np.uint8)
    x0, y0, x1, y1 = DEFECT
    img[y0:y1, x0:x1] = 255
    return gray3(img)


def test_full_train_pipeline_box_follows_defect():
    cfg = make_cfg()
    cfg.INPUT.HARMONIZE.RESIZE = 160  # stretch: anisotropic, so x/y mix-ups show
    augs = build_augmentations(cfg, is_train=True)
    dw, dh = DEFECT[2] - DEFECT[0], DEFECT[3] - DEFECT[1]
    angles, flips = [], set()
    for seed in range(40):
        out, boxes, tfms = run(augs, defect_image(), [DEFECT], seed)
        assert out.shape == (160, 160, 3) and out.dtype == np.uint8
        assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 0] == out[:, :, 2]).all()
        box = boxes[0]
        frac_inside, tight, count = bright_stats(out, box)
        assert frac_inside >= 0.99, (seed, frac_inside)
        # The transformed box is the rotated rectangle's tight box, so the bright pixels span it
        # (up to interpolation at the rotated corners' tips).
        np.testing.assert_allclose(tight, box, atol=1.5, err_msg=f"seed {seed}")
        # Fill: rectangle area / area of its rotated-corner box (invariant under the resize).
        rot = find(tfms, T.RotationTransform)
        theta = np.deg2rad(rot.angle if rot is not None else 0.0)
        c, s = abs(np.cos(theta)), abs(np.sin(theta))
        expected_fill = dw * dh / ((dw * c + dh * s) * (dw * s + dh * c))
        fill = count / ((box[2] - box[0]) * (box[3] - box[1]))
        assert abs(fill - expected_fill) < 0.04, (seed, fill, expected_fill)
        angles.append(np.rad2deg(theta))
        flips.add((find(tfms, T.HFlipTransform) is not None, find(tfms, T.VFlipTransform) is not None))
    assert max(np.abs(angles)) <= 30 and max(angles) > 10 and min(angles) < -10
    assert len(flips) == 4  # every flip combination was exercised


def test_rotation_box_is_rotated_corner_box():
    cfg = make_cfg(all_off=True, ROTATION=True, ROTATION_DEG=45.0)
    cfg.INPUT.HARMONIZE.RESIZE = 0
    augs = build_augmentations(cfg, is_train=True)
    for seed in range(10):
        out, boxes, tfms = run(augs, defect_image(), [DEFECT], seed)
        angle = find(tfms, T.RotationTransform).angle
        assert -45 <= angle <= 45 and out.shape == (H, W, 3)  # expand=False keeps the size
        np.testing.assert_allclose(boxes[0], rotated_box(DEFECT, angle, W / 2, H / 2), atol=1e-6)
        _, tight, _ = bright_stats(out, boxes[0])
        np.testing.assert_allclose(tight, boxes[0], atol=1.5)


@pytest.mark.parametrize("key", ["HFLIP", "VFLIP"])
def test_flip_mirrors_image_and_box_exactly(key):
    cfg = make_cfg(all_off=True, **{key: True})
    cfg.INPUT.HARMONIZE.RESIZE = 0
    augs = build_augmentations(cfg, is_train=True)
    img = textured(30, 40)
    box = np.array([5.0, 7.0, 20.0, 25.0])
    if key == "HFLIP":
        mirrored_img, mirrored_box = img[:, ::-1], np.array([40 - 20, 7, 40 - 5, 25.0])
    else:
        mirrored_img, mirrored_box = img[::-1], np.array([5, 30 - 25, 20, 30 - 7.0])
    seen = set()
    for seed in range(20):
        out, boxes, _ = run(augs, img, [box], seed)
        flipped = not np.array_equal(out, img)
        seen.add(flipped)
        np.testing.assert_array_equal(out, mirrored_img if flipped else img)
        np.testing.assert_array_equal(boxes[0], mirrored_box if flipped else box)
    assert seen == {True, False}


def test_crop_is_a_window_and_box_shifts_exactly():
    cfg = make_cfg(all_off=True, CROP=True, CROP_RANGE=[0.5, 0.9])
    cfg.INPUT.HARMONIZE.RESIZE = 0
    augs = build_augmentations(cfg, is_train=True)
    img = textured(60, 80)
    box = np.array([10.0, 10.0, 70.0, 50.0])
    fractions = []
    for seed in range(30):
        out, boxes, tfms = run(augs, img, [box], seed)
        crop = find(tfms, T.CropTransform)
        np.testing.assert_array_equal(out, img[crop.y0:crop.y0 + crop.h, crop.x0:crop.x0 + crop.w])
        np.testing.assert_array_equal(boxes[0], box - [crop.x0, crop.y0, crop.x0, crop.y0])
        fractions += [crop.h / 60, crop.w / 80]
    assert 0.5 - 0.01 <= min(fractions) < 0.6 and 0.8 < max(fractions) <= 0.9 + 0.01


# --- (b) pixel transforms against hand computations ------------------------------------------


@pytest.mark.parametrize("clip,tiles", [(2.0, 8), (4.0, 3)])
def test_clahe_matches_cv2(clip, tiles):
    img = textured(64, 96)
    out, _, _ = run([CLAHE(clip, tiles)], img)
    expected = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(img[:, :, 0])
    assert not np.array_equal(expected, img[:, :, 0])
    for ch in range(3):
        np.testing.assert_array_equal(out[:, :, ch], expected)


def test_clahe_keeps_a_single_channel():
    img = textured(32, 32)[:, :, :1]
    out, _, _ = run([CLAHE(2.0, 4)], img)
    assert out.shape == (32, 32, 1)
    np.testing.assert_array_equal(out[:, :, 0], cv2.createCLAHE(2.0, (4, 4)).apply(img[:, :, 0]))


def test_gamma_matches_formula_for_sampled_gamma():
    img = gray3(np.tile(np.arange(256, dtype=np.uint8), (4, 1)))
    gammas = []
    for seed in range(8):
        out, _, tfms = run([RandomGamma(0.5, 2.0)], img, seed=seed)
        g = find(tfms, T.ColorTransform).gamma
        gammas.append(g)
        expected = 255.0 * (img.astype(float) / 255.0) ** g
        assert out.dtype == np.uint8
        assert np.abs(out - expected).max() <= 0.5 + 1e-9
    assert all(0.5 <= g <= 2.0 for g in gammas) and len(set(gammas)) == len(gammas)


def test_gaussian_noise_std_and_reproducibility():
    sigma = 0.04
    img = np.full((200, 200, 3), 128, np.uint8)
    a, _, _ = run([RandomGaussianNoise(sigma)], img, seed=3)
    b, _, _ = run([RandomGaussianNoise(sigma)], img, seed=3)
    c, _, _ = run([RandomGaussianNoise(sigma)], img, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 0] == a[:, :, 2]).all()
    diff = a[:, :, 0].astype(float) - 128
    assert abs(diff.std() - sigma * 255) < 0.05 * sigma * 255  # 40k samples: ~0.4% std error
    assert abs(diff.mean()) < 0.2


def test_gaussian_noise_clips_to_uint8_range():
    img = gray3(np.array([[0, 255] * 50] * 100, np.uint8))
    out, _, _ = run([RandomGaussianNoise(0.1)], img, seed=0)
    assert out.dtype == np.uint8
    assert (out[:, 0::2] < 128).all() and (out[:, 1::2] > 128).all()  # no wrap-around
    assert (out[:, 0::2] == 0).mean() > 0.4 and (out[:, 1::2] == 255).mean() > 0.4


# --- (c) switches -----------------------------------------------------------------------------


def test_all_switches_off_only_resizes():
    img = textured(60, 80)
    for resize in (48, 0):
        cfg = make_cfg(all_off=True)
        cfg.INPUT.HARMONIZE.RESIZE = resize
        augs = build_augmentations(cfg, is_train=True)
        assert [type(a) for a in augs] == ([T.Resize] if resize else [])
        expected = T.Resize((resize, resize)).get_transform(img).apply_image(img) if resize else img
        box = [10.0, 10.0, 70.0, 50.0]
        s = resize / np.array([80, 60, 80, 60]) if resize else 1.0
        for seed in range(5):
            out, boxes, _ = run(augs, img, [box], seed)
            np.testing.assert_array_equal(out, expected)
            np.testing.assert_allclose(boxes[0], np.array(box) * s)


def test_aug_disabled_or_test_time_is_deterministic_harmonization():
    img = textured(60, 80)
    cfg = make_cfg(ENABLED=False)
    cfg.INPUT.HARMONIZE.RESIZE = 64
    harm = build_harmonization(cfg)
    assert [type(a) for a in harm] == [CLAHE, T.Resize]
    for augs in (build_augmentations(cfg, is_train=True), build_augmentations(make_cfg(), False)):
        assert [type(a) for a in augs] == [CLAHE, T.Resize]
    outs = [run(build_augmentations(cfg, True), img, seed=s)[0] for s in range(3)]
    clahe = cv2.createCLAHE(2.0, (8, 8)).apply(img[:, :, 0])
    np.testing.assert_array_equal(outs[0], T.Resize((64, 64)).get_transform(img).apply_image(gray3(clahe)))
    assert all(np.array_equal(o, outs[0]) for o in outs)


def test_each_switch_adds_its_augmentation():
    base = [type(a) for a in build_augmentations(make_cfg(all_off=True), True)]
    for key, cls in [("GAMMA", RandomGamma), ("NOISE", RandomGaussianNoise),
                     ("ROTATION", T.RandomRotation), ("CROP", T.RandomCrop),
                     ("HFLIP", T.RandomFlip), ("VFLIP", T.RandomFlip)]:
        augs = build_augmentations(make_cfg(all_off=True, **{key: True}), True)
        assert len(augs) == len(base) + 1 and any(isinstance(a, cls) for a in augs), key


# --- (d) resize policies ----------------------------------------------------------------------


@pytest.mark.parametrize("is_train", [True, False])
@pytest.mark.parametrize("policy,max_size,strip_shape,square_shape", [
    ("stretch", 1333, (512, 512), (512, 512)),
    ("shortest_edge", 1333, (round(256 * 1333 / 1600), 1333), (512, 512)),  # capped long side
    ("shortest_edge", 4000, (512, 3200), (512, 512)),
    ("longest_edge", 1333, (round(256 * 512 / 1600), 512), (512, 512)),
])
def test_resize_policies(policy, max_size, strip_shape, square_shape, is_train):
    cfg = make_cfg(all_off=True)
    cfg.INPUT.HARMONIZE.RESIZE, cfg.INPUT.HARMONIZE.RESIZE_POLICY = 512, policy
    cfg.INPUT.MAX_SIZE_TEST = max_size
    augs = build_augmentations(cfg, is_train)
    for (h, w), expected in [((256, 1600), strip_shape), ((200, 200), square_shape)]:
        out, _, _ = run(augs, np.zeros((h, w, 3), np.uint8))
        assert out.shape == (*expected, 3), (policy, h, w)


def test_invalid_settings_raise():
    cfg = make_cfg()
    cfg.INPUT.HARMONIZE.RESIZE_POLICY = "squash"
    with pytest.raises(ValueError, match="RESIZE_POLICY"):
        build_harmonization(cfg)
    with pytest.raises(ValueError):
        build_augmentations(make_cfg(CROP_RANGE=[0.0, 1.0]), True)
    with pytest.raises(ValueError):
        build_augmentations(make_cfg(GAMMA_RANGE=[1.5, 0.5]), True)
    with pytest.raises(ValueError):
        RandomGaussianNoise(-0.1)
