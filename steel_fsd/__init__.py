"""steel-fsd: few-shot, cross-dataset steel surface defect detection on Detectron2.

Importing the package registers the prototype ROI head with Detectron2's registry and the datasets
found under ``$STEEL_FSD_DATASETS`` (default ``./datasets``) with its DatasetCatalog.
"""
from . import data, modeling  # noqa: F401  (registration side effects)
from .config import add_steel_fsd_config  # noqa: F401

__version__ = "0.1.0"
