"""The detector's models (needs the ``mmlab`` extra: mmcv, OpenCV, pycocotools).

``backbones.ResNet``, ``necks.FPN``, ``dense_heads.FCOSHead``, ``detectors.FCOS``: a detector
whose convolutions turn deformable from its config (through ``dcn_plugin.layers``); ``losses``,
``bbox`` (IoU, NMS with torch ops), ``data_preprocessor``; ``deploy``: ONNX export of the detector
and ``ONNXRuntimeDetector`` (need the ``deploy`` extra too, imported only when used).
"""

from .._extras import DETECTOR_MODULES, require

require("dcn_plugin.models", DETECTOR_MODULES, extra="mmlab")

from .. import layers  # noqa: E402,F401  (the layers the models build by name)
from . import backbones, dense_heads, deploy, detectors, losses, necks  # noqa: E402
from .backbones import ResNet  # noqa: E402
from .data_preprocessor import DetDataPreprocessor  # noqa: E402
from .dense_heads import FCOSHead  # noqa: E402
from .detectors import FCOS, SingleStageDetector  # noqa: E402
from .necks import FPN  # noqa: E402

__all__ = [
    "backbones", "deploy", "necks", "dense_heads", "detectors", "losses",
    "ResNet", "FPN", "FCOSHead", "FCOS", "SingleStageDetector", "DetDataPreprocessor",
]
