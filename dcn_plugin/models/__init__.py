"""The detector's models (needs the ``mmlab`` extra: mmcv, OpenCV, pycocotools).

``backbones.ResNet``, ``necks.FPN``, ``dense_heads.FCOSHead``, ``detectors.FCOS``: a detector
whose convolutions turn deformable from its config (through ``dcn_plugin.layers``);
``detectors.FasterRCNN`` and ``detectors.RFCN`` with ``dense_heads.RPNHead`` and ``roi_heads``,
whose RoI pooling turns deformable from its config too; ``task_modules`` (anchors, box coder,
assigner, sampler); ``losses``, ``bbox`` (IoU, NMS with torch ops), ``data_preprocessor``;
``deploy``: ONNX export of the detector and ``ONNXRuntimeDetector`` (need the ``deploy`` extra
too, imported only when used).
"""

from .._extras import DETECTOR_MODULES, require

require("dcn_plugin.models", DETECTOR_MODULES, extra="mmlab")

from .. import layers  # noqa: E402,F401  (the layers the models build by name)
from . import backbones, dense_heads, deploy, detectors, losses, necks, roi_heads, task_modules  # noqa: E402
from .backbones import ResNet  # noqa: E402
from .data_preprocessor import DetDataPreprocessor  # noqa: E402
from .dense_heads import FCOSHead, RPNHead  # noqa: E402
from .detectors import FCOS, RFCN, FasterRCNN, SingleStageDetector, TwoStageDetector  # noqa: E402
from .necks import FPN  # noqa: E402

__all__ = [
    "backbones", "deploy", "necks", "dense_heads", "detectors", "losses",
    "roi_heads", "task_modules", "ResNet", "FPN", "FCOSHead", "RPNHead", "FCOS", "SingleStageDetector",
    "TwoStageDetector", "FasterRCNN", "RFCN", "DetDataPreprocessor",
]
