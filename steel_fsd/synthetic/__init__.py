"""Synthetic NEU-DET and Severstal look-alikes for the demo, the tests and the benchmarks: test-data
generators, kept apart from the readers of real data (:mod:`steel_fsd.data`), which load their output."""
from .generators import (make_neu_synthetic, make_severstal_csv_only, make_severstal_synthetic, mask_voc_box,
                         neu_voc_xml, render_neu_image, render_severstal_image, severstal_image_ids, severstal_plan)

__all__ = ["make_neu_synthetic", "make_severstal_csv_only", "make_severstal_synthetic", "mask_voc_box",
           "neu_voc_xml", "render_neu_image", "render_severstal_image", "severstal_image_ids", "severstal_plan"]
