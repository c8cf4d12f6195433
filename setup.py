#!/usr/bin/env python
"""steel-fsd: a Detectron2 extension for few-shot, cross-dataset steel surface defect detection.

torch, torchvision and Detectron2 are installed separately (see README: `make demo` / `make test`
do it), as Detectron2's own projects do.
"""
from setuptools import find_packages, setup

setup(
    name="steel-fsd",
    version="0.1.0",
    description="Few-shot, cross-dataset steel surface defect detection on Detectron2",
    packages=find_packages(include=["steel_fsd", "steel_fsd.*"]),
    python_requires=">=3.9",
    install_requires=["numpy", "opencv-python-headless>=4.5", "pycocotools>=2.0.2", "matplotlib", "tqdm"],
)
