"""dcn_plugin: N-d deformable convolution for PyTorch and OpenMMLab.

- ``dcn_plugin.ops``: the functional API and ``nn`` modules; needs torch only.
- ``dcn_plugin.layers``: the config-facing DCN family in mmengine's registries; needs mmengine.
  Importing ``dcn_plugin`` (e.g. ``custom_imports=dict(imports=['dcn_plugin'])``) registers them
  where mmengine is installed.
- ``dcn_plugin.compat.mmcv``, ``dcn_plugin.compat.detectron2``: drop-in replacements for
  ``mmcv.ops``' and ``detectron2.layers``' deformable layers; need torch only; imported on demand.
- ``dcn_plugin.models``, ``datasets``, ``evaluation``: the detector; need the ``mmlab`` extra
  (mmcv-lite or mmcv-full, OpenCV, pycocotools) and are imported on demand.

Importing the package prints nothing.
"""

from . import ops
from ._extras import installed as _installed
from .ops import has_ops, with_cuda

__version__ = "0.1.0"

if _installed("mmengine"):
    from . import layers  # noqa: F401

__all__ = ["ops", "has_ops", "with_cuda", "__version__"]
