"""Deployment export: a trained model (with its prototypes, if any) as TorchScript through Detectron2's
``TracingAdapter``, and as ONNX where the installed torch/onnx support it.

The exported model takes one harmonized image (CHW uint8 in INPUT.FORMAT, after CLAHE and the resize of
INPUT.HARMONIZE; the model normalizes pixels itself) and returns ``(boxes XYXY, classes, scores, image size)``
in that image's pixels, as the eager model's ``inference(..., do_postprocess=False)``.
"""
from __future__ import annotations

import importlib
import os
import sys
import types

import detectron2
import torch

__all__ = ["tracing_adapter_class", "trace_model", "export_onnx"]


def tracing_adapter_class():
    """Detectron2's ``TracingAdapter``. Detectron2 v0.6's ``detectron2.export`` package imports caffe2 (gone
    from PyTorch) at import time, so there its ``flatten`` module is imported without the package's
    ``__init__``; later Detectron2 versions import normally."""
    try:
        from detectron2.export import TracingAdapter
        return TracingAdapter
    except ImportError:
        name = "detectron2.export"
        sys.modules.pop(name, None)
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
        sys.modules[name] = package
        return importlib.import_module(f"{name}.flatten").TracingAdapter


def _inference(model, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def trace_model(model: torch.nn.Module, image: torch.Tensor) -> tuple[torch.jit.ScriptModule, object]:
    """Trace ``model`` (eval mode) on one harmonized CHW image -> (TorchScript module, the adapter, whose
    ``outputs_schema`` rebuilds ``Instances`` from the flat outputs)."""
    adapter = tracing_adapter_class()(model.eval(), [{"image": image}], _inference)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter


def export_onnx(model: torch.nn.Module, image: torch.Tensor, path: str, opset: int = 16) -> None:
    """ONNX through the same adapter; raises RuntimeError naming what is missing when this environment
    cannot export ONNX (e.g. the ``onnx`` package is not installed)."""
    adapter = tracing_adapter_class()(model.eval(), [{"image": image}], _inference)
    try:
        with torch.no_grad():
            torch.onnx.export(adapter, adapter.flattened_inputs, path, opset_version=opset, dynamo=False)
    except Exception as e:  # torch.onnx raises many kinds; the reason is what the user needs
        raise RuntimeError(f"ONNX export is not supported in this environment ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e
