"""Skips for tests that need an optional dependency, each saying what would make it run."""

from __future__ import annotations

import pytest

_INSTALL = {
    "mmengine": "pip install mmengine",
    "mmcv": "pip install mmcv-lite (the mmlab extra)",
    "cv2": "pip install opencv-python (the mmlab extra)",
    "pycocotools": "pip install pycocotools (the mmlab extra)",
    "onnx": "pip install onnx (the deploy extra)",
    "onnxscript": "pip install onnxscript (the deploy extra)",
    "onnxruntime": "pip install onnxruntime==1.32.0 (the deploy extra)",
}


def require(*modules: str) -> None:
    """``pytest.importorskip`` each module, with a reason naming what to install (tools/setup.sh
    installs all of them)."""
    for module in modules:
        top = module.split(".")[0]
        how = _INSTALL.get(top, f"pip install {top}")
        pytest.importorskip(module, reason=f"needs {module}: {how}, or run tools/setup.sh")


def require_detector() -> None:
    """The detector's rooms need mmengine plus the mmlab extra."""
    require("mmengine", "mmcv.cnn", "cv2", "pycocotools")


def require_deploy() -> None:
    """ONNX export and onnxruntime: the deploy extra."""
    require("onnx", "onnxscript", "onnxruntime")
