"""Steel defect datasets: NEU-DET and Severstal loaders, tiling and Detectron2 registration.

Importing this package registers the datasets found under ``$STEEL_FSD_DATASETS`` (else
``./datasets``); see :func:`register_all`. Absent folders are skipped silently.
"""
from __future__ import annotations

import logging

from .catalog import register_all, register_neu, register_severstal, register_union
from .errors import DatasetError, SkipLog
from .neu import NEU_CLASSES, load_neu_voc
from .severstal import SEVERSTAL_CLASSES, load_severstal, tile_dataset_dicts

__all__ = [
    "NEU_CLASSES", "SEVERSTAL_CLASSES", "DatasetError", "SkipLog", "load_neu_voc", "load_severstal",
    "tile_dataset_dicts", "register_neu", "register_severstal", "register_union", "register_all",
]

try:
    register_all()
except Exception as e:  # importing must never fail because of the datasets folder
    logging.getLogger("steel_fsd").warning("steel_fsd.data: registering datasets failed: %s", e)
