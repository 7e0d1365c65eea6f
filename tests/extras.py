"""Skips for tests that need an optional dependency, each saying what would make it run."""

from __future__ import annotations

import pytest

# Not installed by tools/setup.sh: the real mmcv-full and mmdetection, in a venv of their own.
_MMCV_FULL_ENV = {
    "mmcv.ops": "mmcv-full 2.1.0 (compiled)",
    "mmdet": "mmdetection 3.3.0 beside mmcv-full",
}

_INSTALL = {
    "mmengine": "pip install mmengine",
    "mmcv": "pip install mmcv-lite (the mmlab extra)",
    "cv2": "pip install opencv-python (the mmlab extra)",
    "pycocotools": "pip install pycocotools (the mmlab extra)",
    "onnx": "pip install onnx (the deploy extra)",
    "onnxscript": "pip install onnxscript (the deploy extra)",
    "onnxruntime": "pip install onnxruntime==1.32.0 (the deploy extra)",
    "openvino": "pip install openvino==2026.4.1 (the deploy extra)",
}


def require(*modules: str) -> None:
    """``pytest.importorskip`` each module, with a reason naming what to install: tools/setup.sh
    installs all of them but mmcv-full and mmdetection, which need a venv of their own."""
    for module in modules:
        top = module.split(".")[0]
        if module in _MMCV_FULL_ENV or top in _MMCV_FULL_ENV:
            what = _MMCV_FULL_ENV.get(module, _MMCV_FULL_ENV.get(top))
            reason = (f"needs {what}: `bash ../shared/tools/mmcv-full-env.sh` makes a venv with it, then run "
                      "the tests with that venv's python")
        else:
            reason = f"needs {module}: {_INSTALL.get(top, f'pip install {top}')}, or run tools/setup.sh"
        pytest.importorskip(module, reason=reason)


def require_detector() -> None:
    """The detector needs mmengine plus the mmlab extra."""
    require("mmengine", "mmcv.cnn", "cv2", "pycocotools")


def require_deploy() -> None:
    """ONNX export, onnxruntime and OpenVINO: the deploy extra."""
    require("onnx", "onnxscript", "onnxruntime", "openvino")
