"""Inspection-time use of a trained model: prediction on image folders with tiling and thresholds (``predict``),
TorchScript export (``export``) and the per-stage diagnosis of missed defects (``diagnose``)."""
