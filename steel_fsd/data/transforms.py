"""Harmonization and augmentation for grayscale steel images, as Detectron2 Augmentations.

Pixel-only operations (CLAHE, gamma, noise) are :class:`ColorTransform` subclasses, so boxes,
polygons and masks pass through them unchanged. Geometric operations are Detectron2's own; boxes
follow them through ``Transform.apply_box`` (for rotation: the box of the rotated corners).
"""
from __future__ import annotations

import cv2
import numpy as np
from detectron2.config import CfgNode
from detectron2.data import transforms as T

__all__ = [
    "CLAHE",
    "CLAHETransform",
    "GammaTransform",
    "NoiseTransform",
    "RandomGamma",
    "RandomGaussianNoise",
    "RandomRelativeCrop",
    "RandomSquareResize",
    "build_augmentations",
    "build_harmonization",
]

RESIZE_POLICIES = ("stretch", "shortest_edge", "longest_edge")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class CLAHETransform(T.ColorTransform):
    """Contrast-limited adaptive histogram equalization of the gray channel.

    The input is HxW, HxWx1 or HxWx3 uint8 (3 channels are converted to gray first); the output
    has the input's shape with the equalized gray in every channel.
    """

    def __init__(self, clip_limit: float, tiles: int):
        self.clip_limit, self.tiles = float(clip_limit), int(tiles)
        super().__init__(self._equalize)

    def _equalize(self, img: np.ndarray) -> np.ndarray:
        if img.dtype != np.uint8:
            raise TypeError(f"CLAHE needs a uint8 image, got {img.dtype}")
        if img.ndim == 3 and img.shape[2] == 3:
            gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        elif img.ndim == 3 and img.shape[2] == 1:
            gray = img[:, :, 0]
        else:
            gray = img
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tiles, self.tiles))
        out = clahe.apply(np.ascontiguousarray(gray))
        if img.ndim == 3:
            out = np.repeat(out[:, :, None], img.shape[2], axis=2)
        return out


class GammaTransform(T.ColorTransform):
    """``255 * (x / 255) ** gamma`` per pixel; uint8 input is rounded back to uint8."""

    def __init__(self, gamma: float):
        self.gamma = float(gamma)
        super().__init__(self._adjust)

    def _adjust(self, img: np.ndarray) -> np.ndarray:
        out = 255.0 * np.power(img.astype(np.float64) / 255.0, self.gamma)
        return _to_uint8(out) if img.dtype == np.uint8 else out.astype(img.dtype)


class NoiseTransform(T.ColorTransform):
    """Adds a fixed HxW noise plane (in intensity units) to every channel, clipped to [0, 255]."""

    def __init__(self, noise: np.ndarray):
        self.noise = np.asarray(noise, dtype=np.float32)
        super().__init__(self._add)

    def _add(self, img: np.ndarray) -> np.ndarray:
        if img.shape[:2] != self.noise.shape:
            raise ValueError(f"noise is {self.noise.shape}, image is {img.shape[:2]}")
        noise = self.noise if img.ndim == 2 else self.noise[:, :, None]
        out = img.astype(np.float32) + noise
        return _to_uint8(out) if img.dtype == np.uint8 else np.clip(out, 0, 255).astype(img.dtype)


class CLAHE(T.Augmentation):
    """Deterministic CLAHE (``cv2.createCLAHE(clip_limit, (tiles, tiles))``) on the gray channel."""

    def __init__(self, clip_limit: float = 2.0, tiles: int = 8):
        if clip_limit <= 0 or tiles < 1:
            raise ValueError(f"CLAHE needs clip_limit > 0 and tiles >= 1, got {clip_limit}, {tiles}")
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> CLAHETransform:
        return CLAHETransform(self.clip_limit, self.tiles)


class RandomGamma(T.Augmentation):
    """Gamma correction with gamma sampled uniformly from ``[lo, hi]``."""

    def __init__(self, lo: float, hi: float):
        if not 0 < lo <= hi:
            raise ValueError(f"RandomGamma needs 0 < lo <= hi, got [{lo}, {hi}]")
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> GammaTransform:
        return GammaTransform(np.random.uniform(self.lo, self.hi))


class RandomGaussianNoise(T.Augmentation):
    """Additive zero-mean Gaussian noise with std ``sigma * 255``, the same in every channel.

    The noise is drawn here (numpy's global RNG, which Detectron2 seeds per worker), so a seeded
    run reproduces it exactly.
    """

    def __init__(self, sigma: float):
        if sigma < 0:
            raise ValueError(f"RandomGaussianNoise needs sigma >= 0, got {sigma}")
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> NoiseTransform:
        return NoiseTransform(np.random.normal(0.0, self.sigma * 255.0, size=image.shape[:2]))


class RandomRelativeCrop(T.RandomCrop):
    """Random crop whose height and width fractions are sampled independently from ``[lo, hi]``.

    Detectron2's ``"relative_range"`` crop only allows ``hi == 1``; this generalizes it.
    """

    def __init__(self, lo: float, hi: float = 1.0):
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop range needs 0 < lo <= hi <= 1, got [{lo}, {hi}]")
        super().__init__("relative_range", (lo, lo))
        self.lo, self.hi = float(lo), float(hi)

    def get_crop_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = image_size
        ch, cw = np.random.uniform(self.lo, self.hi, size=2)
        return max(1, min(h, int(h * ch + 0.5))), max(1, min(w, int(w * cw + 0.5)))


def _clahe(cfg: CfgNode) -> list[T.Augmentation]:
    h = cfg.INPUT.HARMONIZE
    return [CLAHE(h.CLAHE_CLIP, h.CLAHE_TILES)] if h.CLAHE else []


class RandomSquareResize(T.Augmentation):
    """Multi-scale training: ``s`` drawn uniformly from ``sizes``, then stretch to ``s x s`` (``longest=False``,
    the "stretch" policy) or scale the longest edge to ``s`` keeping the aspect ratio (``longest=True``)."""

    def __init__(self, sizes, longest: bool = False):
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"RandomSquareResize needs sizes >= 1, got {sizes}")
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.ResizeTransform:
        s, (h, w) = int(np.random.choice(self.sizes)), image.shape[:2]
        if not self.longest:
            return T.ResizeTransform(h, w, s, s)
        k = s / max(h, w)
        return T.ResizeTransform(h, w, max(1, int(h * k + 0.5)), max(1, int(w * k + 0.5)))


def _train_resize(cfg: CfgNode) -> list[T.Augmentation]:
    """The harmonization's resize, or with INPUT.AUG.SCALES a size drawn per image (same policy)."""
    scales = [int(s) for s in cfg.INPUT.AUG.SCALES]
    if not scales:
        return _resize(cfg)
    if min(scales) < 1:
        raise ValueError(f"INPUT.AUG.SCALES must be sizes >= 1, got {scales}")
    policy = cfg.INPUT.HARMONIZE.RESIZE_POLICY
    _resize(cfg)  # the policy and the test size are checked as at test time
    if policy == "stretch":
        return [RandomSquareResize(scales)]
    if policy == "shortest_edge":
        return [T.ResizeShortestEdge(scales, max_size=max(max(scales), cfg.INPUT.MAX_SIZE_TEST), sample_style="choice")]
    return [RandomSquareResize(scales, longest=True)]


def _resize(cfg: CfgNode) -> list[T.Augmentation]:
    size, policy = int(cfg.INPUT.HARMONIZE.RESIZE), cfg.INPUT.HARMONIZE.RESIZE_POLICY
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"INPUT.HARMONIZE.RESIZE_POLICY must be one of {RESIZE_POLICIES}, got {policy!r}")
    if size < 0:
        raise ValueError(f"INPUT.HARMONIZE.RESIZE must be >= 0, got {size}")
    if size == 0:
        return []
    if policy == "stretch":
        return [T.Resize((size, size))]
    if policy == "shortest_edge":
        # Same cap at train and test (harmonization must not differ between them).
        return [T.ResizeShortestEdge(size, max_size=max(size, cfg.INPUT.MAX_SIZE_TEST))]
    # longest_edge: scaling the short side to S makes the long side >= S, so a cap of S always
    # binds and rescales the long side to exactly S, keeping the aspect ratio.
    return [T.ResizeShortestEdge(size, max_size=size)]


class _CopyingHFlip(T.HFlipTransform):
    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return super().apply_image(img).copy()


class _CopyingVFlip(T.VFlipTransform):
    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return super().apply_image(img).copy()


class RandomFlip(T.RandomFlip):
    """Detectron2's ``RandomFlip`` whose flipped image is a copy, not a negative-stride view: for an image one
    pixel wide (or high) NumPy calls the view contiguous, so the next transform's ``torch.from_numpy`` failed."""

    def get_transform(self, image):
        t = super().get_transform(image)
        if isinstance(t, T.HFlipTransform):
            return _CopyingHFlip(t.width)
        if isinstance(t, T.VFlipTransform):
            return _CopyingVFlip(t.height)
        return t


def build_harmonization(cfg: CfgNode) -> list[T.Augmentation]:
    """Deterministic preprocessing used at train and test time: CLAHE (if on), then resize."""
    return _clahe(cfg) + _resize(cfg)


def build_augmentations(cfg: CfgNode, is_train: bool) -> list[T.Augmentation]:
    """The mapper's augmentation list.

    Train (with ``INPUT.AUG.ENABLED``): CLAHE -> crop -> rotation -> h/v flips -> resize (a size drawn from
    ``INPUT.AUG.SCALES`` when given) -> gamma -> noise, each per its switch. Test, or augmentation disabled: :func:`build_harmonization`.
    """
    aug = cfg.INPUT.AUG
    if not is_train or not aug.ENABLED:
        return build_harmonization(cfg)
    augs = _clahe(cfg)
    if aug.CROP:
        augs.append(RandomRelativeCrop(*aug.CROP_RANGE))
    if aug.ROTATION and aug.ROTATION_DEG > 0:
        deg = float(aug.ROTATION_DEG)
        augs.append(T.RandomRotation([-deg, deg], expand=False))
    if aug.HFLIP:
        augs.append(RandomFlip(prob=0.5, horizontal=True, vertical=False))
    if aug.VFLIP:
        augs.append(RandomFlip(prob=0.5, horizontal=False, vertical=True))
    augs += _train_resize(cfg)
    if aug.GAMMA:
        augs.append(RandomGamma(*aug.GAMMA_RANGE))
    if aug.NOISE:
        augs.append(RandomGaussianNoise(aug.NOISE_SIGMA))
    return augs
