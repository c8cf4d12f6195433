"""steel-fsd: few-shot, cross-dataset steel surface defect detection on Detectron2.

Importing the package only registers its model components (the prototype ROI head) with Detectron2's
registries. Datasets are registered explicitly: ``steel_fsd.data.register_all(root)`` (the tools call it
once, with ``$STEEL_FSD_DATASETS``, default ``./datasets``).
"""
from . import modeling  # noqa: F401  (registers the model components)
from .config import add_steel_fsd_config  # noqa: F401

__version__ = "0.1.0"
