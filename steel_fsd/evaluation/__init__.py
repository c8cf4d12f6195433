from .prf import PRFEvaluator, build_prf_evaluator, match_detections, prf_from_counts  # noqa: F401
