"""Which optional dependencies are installed, and a clear error for a part of the package whose extra
is missing.

The parts of the package and what each needs (pyproject's extras name the pip packages):

- ``dcn_plugin.ops``: torch only;
- ``dcn_plugin.layers``, ``dcn_plugin.registry``: mmengine;
- the detector (``dcn_plugin.models``, ``datasets``, ``evaluation``, ``tools/``): the ``mmlab``
  extra, i.e. mmcv (mmcv-lite or mmcv-full), OpenCV and pycocotools;
- ``dcn_plugin.export`` (ONNX export): the ``deploy`` extra, i.e. onnx and onnxscript, plus
  onnxruntime or OpenVINO to run the exported models.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

__all__ = ["DEPLOY_MODULES", "DETECTOR_MODULES", "installed", "require"]

# Module name -> what to pip install for it.
_PIP_NAMES = {
    "mmengine": "mmengine",
    "mmcv": "mmcv-lite (or mmcv-full)",
    "cv2": "opencv-python",
    "pycocotools": "pycocotools",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
}
DETECTOR_MODULES = ("mmcv", "cv2", "pycocotools")
DEPLOY_MODULES = ("onnx", "onnxscript")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a module blocked in sys.modules
        return False


def require(what: str, modules: Sequence[str], extra: str = "") -> None:
    """Raises ``ImportError`` naming what ``what`` (a module or function) needs where any of
    ``modules`` is missing."""
    missing = [m for m in modules if not installed(m)]
    if not missing:
        return
    packages = ", ".join(_PIP_NAMES.get(m, m) for m in missing)
    hint = f"pip install 'dcn_plugin[{extra}]' (or: {packages})" if extra else f"pip install {packages}"
    raise ImportError(f"{what} needs {', '.join(missing)}, which is not installed: {hint}")
