"""The one image reader (training, registration, calibration, predict): every image a user can hand over is read
correctly (against values computed independently) or refused by name, without hanging."""
import os
import threading

import cv2
import numpy as np
import pytest
from PIL import Image

from steel_fsd.data import images as images_mod
from steel_fsd.data.errors import DatasetError
from steel_fsd.data.images import read_image


def _gradient(h=12, w=20):
    return (np.arange(h * w).reshape(h, w) * 7 % 256).astype(np.uint8)


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    """A 16-bit PNG was read as all-white; it is scaled by 255/65535 over the full range."""
    g16 = (np.arange(12 * 20).reshape(12, 20) * 271).astype(np.uint16)
    p = str(tmp_path / "g16.png")
    assert cv2.imwrite(p, g16)
    assert Image.open(p).mode.startswith("I;16")
    expect = np.rint(g16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    got = read_image(p, "BGR")
    assert got.shape == (12, 20, 3) and got.dtype == np.uint8
    assert np.array_equal(got[:, :, 0], expect) and np.array_equal(got[:, :, 2], expect)
    assert np.array_equal(read_image(p, "L")[:, :, 0], expect)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "1", "CMYK"])
def test_every_pil_mode_reads_as_its_8_bit_rgb(tmp_path, mode):
    rgb = np.stack([_gradient(), 255 - _gradient(), np.full((12, 20), 90, np.uint8)], axis=2)
    src = Image.fromarray(rgb).convert(mode)
    p = str(tmp_path / ("img.jpg" if mode == "CMYK" else "img.png"))
    src.save(p, quality=100) if mode == "CMYK" else src.save(p)
    expect = np.asarray(Image.open(p).convert("RGB"))  # Pillow's own conversion of the stored file
    got = read_image(p, "RGB")
    assert got.shape == (12, 20, 3) and got.dtype == np.uint8
    assert np.array_equal(got, expect)
    assert np.array_equal(read_image(p, "BGR"), expect[:, :, ::-1])


def test_one_pixel_and_long_thin_images_read(tmp_path):
    for h, w in ((1, 1), (30, 1600), (1600, 3)):
        p = str(tmp_path / f"{h}x{w}.png")
        cv2.imwrite(p, np.full((h, w), 77, np.uint8))
        got = read_image(p)
        assert got.shape == (h, w, 3) and (got == 77).all()


def test_fifo_folder_and_missing_file_are_refused_by_name_without_hanging(tmp_path):
    fifo = str(tmp_path / "x.png")
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            read_image(fifo)
        except DatasetError as e:
            result["error"] = str(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert result["error"].startswith(fifo) and "not a regular file" in result["error"]
    with pytest.raises(DatasetError, match="not a regular file"):
        read_image(str(tmp_path))
    with pytest.raises(DatasetError, match="not found"):
        read_image(str(tmp_path / "missing.png"))


def test_decompression_bomb_is_refused_by_name_before_decoding(tmp_path, monkeypatch):
    p = str(tmp_path / "big.png")
    cv2.imwrite(p, np.zeros((40, 50), np.uint8))
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 1999)
    with pytest.raises(DatasetError, match=r"big.png: 50x40 image has 2,000 pixels, more than the limit"):
        read_image(p)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 2000)
    assert read_image(p).shape == (40, 50, 3)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.stack([_gradient()] * 3, axis=2))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is 20 high, 12 wide
    p = str(tmp_path / "rot.jpg")
    img.save(p, exif=exif, quality=100)
    assert read_image(p).shape == (20, 12, 3)


def test_the_pixel_limit_comes_from_the_environment_and_a_bad_value_is_one_clear_error(tmp_path, monkeypatch):
    from steel_fsd.utils.errors import UserError

    p = str(tmp_path / "img.png")
    cv2.imwrite(p, np.zeros((40, 50), np.uint8))
    monkeypatch.setenv("STEEL_FSD_MAX_IMAGE_PIXELS", "1999")
    with pytest.raises(DatasetError, match="more than the limit of 1,999"):
        read_image(p)
    monkeypatch.setenv("STEEL_FSD_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(UserError, match="STEEL_FSD_MAX_IMAGE_PIXELS is 'lots'"):
        read_image(p)
    monkeypatch.delenv("STEEL_FSD_MAX_IMAGE_PIXELS")
    assert read_image(p).shape == (40, 50, 3)
