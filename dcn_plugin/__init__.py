"""dcn_plugin: compiled N-d deformable convolution for PyTorch and OpenMMLab.

``dcn_plugin.ops`` holds the functional API and ``nn`` modules and needs only torch.
"""

from . import ops
from .ops import cuda_version, has_ops, with_cuda

__version__ = "0.1.0"

__all__ = ["ops", "has_ops", "with_cuda", "cuda_version", "__version__"]
