"""steel-fsd: few-shot, cross-dataset steel surface defect detection on Detectron2."""
__version__ = "0.1.0"
