"""Shared fixtures: the real data samples and writers of tiny datasets for bad-input tests."""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_tool(name: str):
    """The module of ``tools/<name>.py``, imported fresh (its ``main`` can then run in this process)."""
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))  # the tools import their ``_path`` helper
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _drop_log_handlers_on_closed_streams():
    """Detectron2's ``setup_logger`` (called by ``DefaultTrainer`` when its logger is not set up) binds a
    console handler to the ``sys.stdout`` of the moment, inside a ``capsys`` test a buffer that is closed when
    that test ends, and caches it. A later record on that logger (Detectron2 main logs each checkpoint load
    at INFO, v0.6 does not) would then print a "Logging error" traceback into another test's stderr."""
    yield
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in list(lg.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                lg.removeHandler(handler)


@pytest.fixture
def isolated_catalogs():
    """Run a test on empty dataset catalogs; the names registered before are restored afterwards, and the loaded
    dataset folders are forgotten. Use with ``pytestmark = pytest.mark.usefixtures("isolated_catalogs")``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from steel_fsd.data.catalog import forget_loaded

    saved = dict(DatasetCatalog), dict(MetadataCatalog)
    DatasetCatalog.clear()
    MetadataCatalog.clear()
    yield
    DatasetCatalog.clear()
    MetadataCatalog.clear()
    DatasetCatalog.update(saved[0])
    MetadataCatalog.update(saved[1])
    forget_loaded()


def _real(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data sample {path} not available")
    return path


@pytest.fixture(scope="session")
def neu_real_root() -> Path:
    """The real NEU-DET sample (flat IMAGES/ + ANNOTATIONS/, 1,440 images)."""
    return _real("neu-det")


@pytest.fixture(scope="session")
def severstal_real_root() -> Path:
    """The real Severstal sample (50 strips) (train.csv, train_v2.csv, train_images/)."""
    return _real("severstal")


def voc_xml(filename: str | None, objects: list[tuple], size: tuple[int, int] | None = (200, 200)) -> str:
    """Pascal VOC text. ``objects``: ``(name, xmin, ymin, xmax, ymax[, difficult])``; ``size``: (w, h) or None."""
    lines = ["<annotation>", "\t<folder>x</folder>"]
    if filename is not None:
        lines.append(f"\t<filename>{filename}</filename>")
    if size is not None:
        lines += ["\t<size>", f"\t\t<width>{size[0]}</width>", f"\t\t<height>{size[1]}</height>",
                  "\t\t<depth>1</depth>", "\t</size>"]
    for name, x0, y0, x1, y1, *rest in objects:
        lines += ["\t<object>", f"\t\t<name>{name}</name>", f"\t\t<difficult>{rest[0] if rest else 0}</difficult>",
                  "\t\t<bndbox>", f"\t\t\t<xmin>{x0}</xmin>", f"\t\t\t<ymin>{y0}</ymin>",
                  f"\t\t\t<xmax>{x1}</xmax>", f"\t\t\t<ymax>{y1}</ymax>", "\t\t</bndbox>", "\t</object>"]
    return "\n".join(lines + ["</annotation>"]) + "\n"


def write_image(path: Path, width: int = 200, height: int = 200) -> Path:
    """A small grayscale image (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), 128, np.uint8), "L").save(path)
    return path


@pytest.fixture
def neu_tmp(tmp_path):
    """Writer of a flat NEU-DET dataset under ``tmp_path/neu``: ``add(stem, objects, filename=..., size=...,
    image=True, xml=None)`` writes ``ANNOTATIONS/<stem>.xml`` (``xml`` = raw text overrides) and, with
    ``image``, ``IMAGES/<stem>.jpg`` (or the name given by ``image`` when it is a str)."""
    root = tmp_path / "neu"
    (root / "ANNOTATIONS").mkdir(parents=True)
    (root / "IMAGES").mkdir()

    def add(stem: str, objects=(), filename: str | None = "", size=(200, 200), image: bool | str = True,
            xml: str | None = None) -> Path:
        fn = f"{stem}.jpg" if filename == "" else filename
        path = root / "ANNOTATIONS" / f"{stem}.xml"
        path.write_text(xml if xml is not None else voc_xml(fn, list(objects), size))
        if image:
            write_image(root / "IMAGES" / (image if isinstance(image, str) else f"{stem}.jpg"))
        return path

    add.root = root
    return add


@pytest.fixture
def severstal_tmp(tmp_path):
    """Writer of a Severstal dataset under ``tmp_path/sev``: ``write(rows, header="v2", images=None)``
    writes ``train.csv`` (v1 header) or ``train_v2.csv`` from raw ``rows`` (lists of fields) and an
    empty file per image name in ``images`` (default: the CSV's image ids). Returns the CSV path."""
    root = tmp_path / "sev"
    (root / "train_images").mkdir(parents=True)

    def write(rows: list[list[str]], header: str = "v2", images: list[str] | None = None) -> Path:
        if header == "v1":
            path, head = root / "train.csv", "ImageId_ClassId,EncodedPixels"
            ids = [r[0].rpartition("_")[0] for r in rows]
        else:
            path, head = root / "train_v2.csv", "ImageId,ClassId,EncodedPixels"
            ids = [r[0] for r in rows]
        path.write_text("\n".join([head] + [",".join(r) for r in rows]) + "\n")
        for name in (ids if images is None else images):
            (root / "train_images" / name).touch()
        return path

    write.root = root
    return write


def spot_images(folder: Path, n: int, seed: int) -> list[tuple[str, list[int]]]:
    """Images of a defect no model here was trained on (a dark spot on a bright, noisy plate) and its box."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = rng.normal(170, 12, (200, 200)).clip(0, 255)
        r, cx, cy = int(rng.integers(14, 24)), int(rng.integers(40, 160)), int(rng.integers(40, 160))
        yy, xx = np.mgrid[:200, :200]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 40
        name = f"spot{seed}_{i}.png"
        Image.fromarray(img.astype(np.uint8), "L").convert("RGB").save(folder / name)
        out.append((name, [cx - r, cy - r, cx + r + 1, cy + r + 1]))
    return out


def write_coco_json(path: Path, images: list[tuple], categories: dict[str, int]) -> Path:
    """A COCO instances file: ``images`` as (file_name, width, height, [(category_id, x0, y0, x1, y1), ...]),
    ``categories`` as name -> COCO id; boxes are written as COCO's [x, y, w, h]."""
    import json

    entries, anns = [], []
    for i, (file_name, width, height, boxes) in enumerate(images, 1):
        entries.append({"id": i, "file_name": file_name, "width": width, "height": height})
        for cat, x0, y0, x1, y1 in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    path.write_text(json.dumps({"images": entries, "annotations": anns,
                                "categories": [{"id": v, "name": k} for k, v in categories.items()]}))
    return path
