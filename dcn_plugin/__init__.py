"""dcn_plugin: compiled N-d deformable convolution for PyTorch and OpenMMLab.

``dcn_plugin.ops`` holds the functional API and ``nn`` modules and needs only torch. Where
mmengine is installed, importing ``dcn_plugin`` (e.g. ``custom_imports=dict(imports=['dcn_plugin'])``)
also registers the OpenMMLab layers of ``dcn_plugin.models``.
"""

import importlib.util as _importlib_util

from . import ops
from .ops import has_ops, with_cuda

__version__ = "0.1.0"

if _importlib_util.find_spec("mmengine") is not None:
    from . import models  # noqa: F401,E402

__all__ = ["ops", "has_ops", "with_cuda", "__version__"]
