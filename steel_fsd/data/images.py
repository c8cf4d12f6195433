"""Image reading by content (not extension), with errors that name the file."""
from __future__ import annotations

import sys
import time

import numpy as np
from detectron2.data import detection_utils
from PIL import UnidentifiedImageError

from .errors import DatasetError, SkipLog


def read_image(path: str, format: str = "BGR") -> np.ndarray:
    """Detectron2's ``read_image`` (by content, EXIF orientation applied, fully decoded so truncated files fail
    here) as HxWx3 uint8 in ``format``, with errors that name the file.

    ``format`` is ``"BGR"``, ``"RGB"`` or ``"L"`` (HxWx1). Severstal's PNG-encoded ``.jpg`` files read correctly.
    """
    try:
        arr = detection_utils.read_image(path, format)
    except FileNotFoundError:
        raise DatasetError(path, "image file not found") from None
    except UnidentifiedImageError:
        raise DatasetError(path, "not a readable image (corrupt or unknown format)") from None
    except (OSError, SyntaxError) as e:
        raise DatasetError(path, f"corrupt or truncated image ({e})") from None
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
