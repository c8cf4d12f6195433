"""Image reading by content (not extension), with errors that name the file."""
from __future__ import annotations

import os
import stat
import sys
import time

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..utils.errors import UserError
from .errors import DatasetError, SkipLog

#: Images with more pixels than this are refused before decoding (a decompression bomb, or not an image a
#: detector of 200-1000 px inputs can use); ``STEEL_FSD_MAX_IMAGE_PIXELS`` changes it (None: read from it).
MAX_IMAGE_PIXELS: int | None = None
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


def max_image_pixels() -> int:
    """:data:`MAX_IMAGE_PIXELS`, else ``$STEEL_FSD_MAX_IMAGE_PIXELS`` (a positive integer), else 100 megapixels;
    a malformed variable is a :class:`UserError` naming it."""
    if MAX_IMAGE_PIXELS is not None:
        return MAX_IMAGE_PIXELS
    raw = os.environ.get("STEEL_FSD_MAX_IMAGE_PIXELS", "")
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"STEEL_FSD_MAX_IMAGE_PIXELS is {raw!r}", "in the environment",
                        "set it to a positive number of pixels, e.g. 100000000, or unset it")
    return value
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # scaled by 255 / 65535


def _to_8bit(img: Image.Image) -> Image.Image:
    """8-bit gray or RGB: 16-bit (and 32-bit integer) gray scaled by 255/65535 (full range, so that one camera's
    images keep their relative brightness), float images clipped to [0, 1] and scaled; palette, CMYK, RGBA,
    LA and 1-bit through Pillow's conversions (alpha dropped)."""
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr * 255.0 / 65535.0), 0, 255).astype(np.uint8))
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8))
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("1", "LA") or (img.mode == "P" and img.palette is not None and img.palette.mode == "L"):
        return img.convert("L")
    return img.convert("RGB")  # P, PA, RGBA, RGBX, CMYK, YCbCr, LAB, HSV


def read_image(path: str, format: str = "BGR") -> np.ndarray:
    """The image at ``path`` (read by content; EXIF orientation applied; fully decoded so truncated files fail
    here) as HxWx3 uint8 in ``format`` (``"BGR"``, ``"RGB"``) or HxWx1 (``"L"``), with errors that name the file.

    One reader for training, registration, calibration and prediction. 8- and 16-bit, gray, RGB, RGBA and
    palette PNGs, CMYK JPEGs, TIFFs and BMPs are converted to 8 bits (see :func:`_to_8bit`). Not a regular file
    (a folder, FIFO or device: reading one could block forever), more than :data:`MAX_IMAGE_PIXELS` pixels, or
    not decodable: :class:`DatasetError`. Severstal's PNG-encoded ``.jpg`` files read correctly.
    """
    if format not in ("BGR", "RGB", "L"):
        raise ValueError(f"image format must be BGR, RGB or L, got {format!r}")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DatasetError(path, "image file not found") from None
    except OSError as e:
        raise DatasetError(path, f"cannot access the image ({e.strerror})") from None
    limit = max_image_pixels()
    if not stat.S_ISREG(mode):
        raise DatasetError(path, "not a regular file (a folder, FIFO or device), not read")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > limit:
                raise DatasetError(path, f"{w}x{h} image has {w * h:,} pixels, more than the limit of "
                                         f"{limit:,} (a decompression bomb?); STEEL_FSD_MAX_IMAGE_PIXELS "
                                         "raises it")
            if w < 1 or h < 1:
                raise DatasetError(path, f"empty image ({w}x{h})")
            img.load()
            img = _to_8bit(ImageOps.exif_transpose(img))
    except DatasetError:
        raise
    except UnidentifiedImageError:
        raise DatasetError(path, "not a readable image (corrupt or unknown format)") from None
    except Image.DecompressionBombError as e:
        raise DatasetError(path, f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(path, f"corrupt or truncated image ({e})") from None
    if format == "L":
        arr = np.asarray(img.convert("L"))[:, :, None]
    else:
        arr = np.asarray(img.convert("RGB"))
        if format == "BGR":
            arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def read_dataset_image(dataset_dict: dict, format: str = "BGR") -> np.ndarray:
    """Read the image of a Detectron2 dataset dict, applying its ``crop_box`` (tiles) if present.

    ``crop_box`` is ``[x0, y0, x1, y1]`` in the source image; the result has the dict's height/width.
    """
    img = read_image(dataset_dict["file_name"], format)
    box = dataset_dict.get("crop_box")
    if box is not None:
        x0, y0, x1, y1 = (int(v) for v in box)
        img = img[y0:y1, x0:x1]
    h, w = dataset_dict.get("height"), dataset_dict.get("width")
    if (h is not None and img.shape[0] != h) or (w is not None and img.shape[1] != w):
        raise DatasetError(dataset_dict["file_name"],
                           f"image is {img.shape[1]}x{img.shape[0]} but the annotation says {w}x{h}")
    return img


def _fmt_time(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def verify_images(dicts: list[dict], skips: SkipLog, label: str, progress: bool = False) -> list[dict]:
    """Fully decode every image (size checked against the dict); progress and ETA on stderr.

    Unreadable (corrupt, truncated, zero-byte, missing) images raise :class:`DatasetError` (naming the
    file) in strict mode, else are dropped and counted in ``skips`` as ``unreadable image``. Returns the
    dicts whose images are good. With ``progress``, progress and ETA go to stderr.
    """
    tty = progress and sys.stderr.isatty()
    every_s = 1.0 if tty else 10.0
    good, t0, last = [], time.monotonic(), -every_s
    for i, d in enumerate(dicts, 1):
        try:
            read_dataset_image(d)
            good.append(d)
        except DatasetError as e:
            skips.problem("unreadable image", e.path, e.cause)
        now = time.monotonic() - t0
        if progress and (now - last >= every_s or i == len(dicts)):
            last = now
            eta = now / i * (len(dicts) - i)
            print(f"{chr(13) if tty else ''}verify {label}: {i}/{len(dicts)} images ({100 * i // len(dicts)}%), "
                  f"elapsed {_fmt_time(now)}, ETA {_fmt_time(eta)}", end="" if tty else "\n",
                  file=sys.stderr, flush=True)
    if dicts and progress and tty:
        print(file=sys.stderr)
    return good
