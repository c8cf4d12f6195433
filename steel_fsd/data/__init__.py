"""Steel defect datasets: NEU-DET, Severstal, magnetic-tile and X-SDD loaders, tiling and Detectron2 registration.

Importing this package registers nothing: call :func:`register_all` (the datasets found under a root,
default ``$STEEL_FSD_DATASETS``, else ``./datasets``) or the ``register_*`` functions.
"""
from __future__ import annotations

from .catalog import (register_all, register_magnetic_tile, register_neu, register_severstal, register_union,
                      register_xsdd)
from .custom import dataset_name, register_datasets, register_user_datasets
from .errors import DatasetError, SkipLog
from .magnetic_tile import MT_CLASSES, load_magnetic_tile
from .neu import NEU_CLASSES, load_neu_voc
from .severstal import SEVERSTAL_CLASSES, load_severstal, tile_dataset_dicts
from .xsdd import XSDD_CLASSES, load_xsdd

__all__ = [
    "NEU_CLASSES", "SEVERSTAL_CLASSES", "MT_CLASSES", "XSDD_CLASSES", "DatasetError", "SkipLog", "load_neu_voc",
    "load_severstal", "load_magnetic_tile", "load_xsdd", "tile_dataset_dicts", "register_neu", "register_severstal",
    "register_magnetic_tile", "register_xsdd", "register_union", "register_all",
]
