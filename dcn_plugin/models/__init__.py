"""OpenMMLab-facing models of dcn_plugin (needs mmengine and ``mmcv.cnn``; ``dcn_plugin.ops`` does not).

- ``layers``: the DCN family as config-facing conv layers (``conv_cfg=dict(type='DCNv2')``);
- ``backbones.ResNet``, ``necks.FPN``, ``dense_heads.FCOSHead``, ``detectors.FCOS``: a detector
  whose convolutions switch to deformable ones from its config;
- ``losses``, ``bbox`` (IoU, NMS with torch ops), ``data_preprocessor``.
"""

# After the layers, which the models build by name.
from . import backbones, dense_heads, detectors, losses, necks  # noqa: E402,I001
from .backbones import ResNet  # noqa: E402
from .data_preprocessor import DetDataPreprocessor  # noqa: E402
from .dense_heads import FCOSHead  # noqa: E402
from .detectors import FCOS, SingleStageDetector  # noqa: E402
from .layers import *  # noqa: F401,F403
from .layers import __all__ as _layers_all
from .necks import FPN  # noqa: E402

__all__ = list(_layers_all) + [
    "backbones", "necks", "dense_heads", "detectors", "losses",
    "ResNet", "FPN", "FCOSHead", "FCOS", "SingleStageDetector", "DetDataPreprocessor",
]
