from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from steel_fsd.config import add_steel_fsd_config
from steel_fsd.data.errors import DatasetError
from steel_fsd.data.mapper import SteelDatasetMapper


def plain_cfg(resize: int = 0):
    """Config with every harmonization/augmentation switch off (pixels pass through unchanged)."""
    cfg = add_steel_fsd_config(get_cfg())
    cfg.INPUT.HARMONIZE.CLAHE = False
    cfg.INPUT.AUG.ENABLED = False
    cfg.INPUT.HARMONIZE.RESIZE = resize
    return cfg


def textured_gray(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:h, 0:w]
    return np.clip(40 + 120 * xx / w + 30 * np.sin(yy / 5) + rng.normal(0, 8, (h, w)), 0, 255).astype(np.uint8)


def save(path, gray: np.ndarray, fmt: str) -> str:
    Image.fromarray(gray).save(path, format=fmt)
    return str(path)


def record(path: str, h: int, w: int, boxes, classes=None, **extra) -> dict:
    classes = classes or [0] * len(boxes)
    annos = [{"bbox": list(map(float, b)), "bbox_mode": BoxMode.XYXY_ABS, "category_id": c, "iscrowd": 0}
             for b, c in zip(boxes, classes)]
    return {"file_name": path, "image_id": 1, "height": h, "width": w, "annotations": annos, **extra}


def test_tile_is_exact_crop_of_png_behind_jpg_name(tmp_path):
    gray = textured_gray(64, 96)
    path = save(tmp_path / "strip.jpg", gray, "PNG")  # Severstal-style PNG data in a .jpg
    d = record(path, 64, 32, [[4, 10, 20, 30]], [2], crop_box=[32, 0, 64, 64])
    out = SteelDatasetMapper(plain_cfg(), is_train=True)(d)
    img = out["image"].numpy()
    assert img.shape == (3, 64, 32) and img.dtype == np.uint8
    for ch in range(3):
        np.testing.assert_array_equal(img[ch], gray[0:64, 32:64])
    np.testing.assert_array_equal(out["instances"].gt_boxes.tensor.numpy(), [[4, 10, 20, 30]])
    assert out["instances"].gt_classes.tolist() == [2]
    assert "annotations" in d and "image" not in d  # the input dict is not modified

    test_out = SteelDatasetMapper(plain_cfg(), is_train=False)(d)
    np.testing.assert_array_equal(test_out["image"].numpy(), img)
    assert "annotations" not in test_out and "instances" not in test_out


def test_truncated_jpeg_raises_dataset_error_naming_file(tmp_path):
    path = save(tmp_path / "defect_042.jpg", textured_gray(128, 128), "JPEG")
    mapper = SteelDatasetMapper(plain_cfg(), is_train=True)
    d = record(path, 128, 128, [[1, 1, 50, 50]])
    assert mapper(d)["image"].shape == (3, 128, 128)  # the intact file reads
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="defect_042.jpg"):
        mapper(d)
    with pytest.raises(DatasetError, match="missing.jpg"):
        mapper(record(str(tmp_path / "missing.jpg"), 128, 128, []))


def test_size_mismatch_raises_dataset_error(tmp_path):
    path = save(tmp_path / "img.png", textured_gray(40, 50), "PNG")
    with pytest.raises(DatasetError, match="img.png"):
        SteelDatasetMapper(plain_cfg(), is_train=False)(record(path, 50, 40, []))


def test_rotated_out_boxes_are_dropped_and_the_rest_clipped(tmp_path):
    path = save(tmp_path / "sq.png", textured_gray(100, 100), "PNG")
    rot45 = T.RotationTransform(100, 100, 45, expand=False)
    mapper = SteelDatasetMapper(is_train=True, augmentations=[rot45], image_format="BGR")
    boxes = [[0, 0, 10, 10], [40, 40, 60, 60], [0, 20, 100, 80]]
    out = mapper(record(path, 100, 100, boxes, [0, 1, 2]))["instances"]
    # The corner box lands left of the image (x in [-20.7, -6.6]): clipped to zero width, dropped.
    assert out.gt_classes.tolist() == [1, 2]
    h = 10 * np.sqrt(2)  # half-diagonal of the centred 20x20 box
    np.testing.assert_allclose(out.gt_boxes.tensor[0].numpy(), [50 - h, 50 - h, 50 + h, 50 + h], atol=1e-3)
    np.testing.assert_allclose(out.gt_boxes.tensor[1].numpy(), [0, 0, 100, 100])  # +-56.6 clipped


def test_train_mapper_boxes_follow_defect_and_stay_inside(tmp_path):
    gray = np.zeros((150, 200), np.uint8)
    gray[60:90, 80:125] = 255
    path = save(tmp_path / "defect.png", gray, "PNG")
    cfg = add_steel_fsd_config(get_cfg())  # everything on
    cfg.INPUT.HARMONIZE.RESIZE = 160
    mapper = SteelDatasetMapper(cfg, is_train=True)
    d = record(path, 150, 200, [[80, 60, 125, 90], [0, 0, 12, 8]], [0, 1])  # 2nd: tiny, at a corner
    kept_corner = 0
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(d)
        img, inst = out["image"].numpy(), out["instances"]
        assert img.shape == (3, 160, 160)
        boxes = inst.gt_boxes.tensor.numpy()
        assert (boxes >= 0).all() and (boxes <= 160).all()
        assert ((boxes[:, 2] - boxes[:, 0]) > 0).all() and ((boxes[:, 3] - boxes[:, 1]) > 0).all()
        kept_corner += 1 in inst.gt_classes.tolist()
        box = boxes[inst.gt_classes.tolist().index(0)]
        ys, xs = np.nonzero(img[0] > 128)
        assert ((xs + 0.5 >= box[0]) & (xs + 0.5 <= box[2]) & (ys + 0.5 >= box[1]) & (ys + 0.5 <= box[3])).all()
        tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        np.testing.assert_allclose(tight, box, atol=1.5, err_msg=f"seed {seed}")
    assert kept_corner < 12  # the corner box is sometimes cropped/rotated away and then dropped


def test_from_config_uses_steel_augmentations():
    cfg = add_steel_fsd_config(get_cfg())
    train, test = SteelDatasetMapper(cfg, is_train=True), SteelDatasetMapper(cfg, is_train=False)
    train_types = [type(a) for a in train.augmentations.augs]
    assert T.RandomRotation in train_types and T.Resize in train_types
    assert [type(a).__name__ for a in test.augmentations.augs] == ["CLAHE", "Resize"]
    assert not train.recompute_boxes
    cfg.MODEL.MASK_ON = True
    assert SteelDatasetMapper(cfg, is_train=True).recompute_boxes
    assert not SteelDatasetMapper(cfg, is_train=False).recompute_boxes


def test_one_pixel_images_train_through_every_augmentation(tmp_path):
    """A 1x1 image used to crash after the flip (a negative-stride view NumPy calls contiguous)."""
    import cv2
    from detectron2.structures import BoxMode

    from steel_fsd.data.mapper import SteelDatasetMapper
    from steel_fsd.engine.setup import build_config

    path = str(tmp_path / "one.png")
    cv2.imwrite(path, np.full((1, 1), 120, np.uint8))
    cfg = build_config(str(Path(__file__).resolve().parents[1] / "configs/demo/proto_R18_FPN_synth_neu.yaml"),
                       ["INPUT.AUG.VFLIP", "True"])
    mapper = SteelDatasetMapper(cfg, True)
    d = {"file_name": path, "height": 1, "width": 1, "image_id": 0,
         "annotations": [{"bbox": [0, 0, 1, 1], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0}]}
    for _ in range(12):  # both flip outcomes, several times
        out = mapper(d)
        size = cfg.INPUT.HARMONIZE.RESIZE
        assert tuple(out["image"].shape[1:]) == (size, size)
        assert out["instances"].gt_boxes.tensor.tolist() == [[0.0, 0.0, float(size), float(size)]]
