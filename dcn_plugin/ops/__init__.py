"""Deformable convolution ops for plain PyTorch users (no mmengine or mmcv needed).

Functional: ``deform_conv{1,2,3}d``, ``deform_conv_transpose{1,2,3}d``, ``mask_softmax{1,2,3}d``,
``mask_sigmoid``. Modules: ``DeformConv{1,2,3}d``, ``DeformConvTranspose{1,2,3}d``,
``PackedDeformConv{1,2,3}d``, ``PackedDeformConvTranspose{1,2,3}d``.
"""

from ._library import has_ops, set_workspace_limit, with_cuda
from .functional import (
    deform_conv,
    deform_conv1d,
    deform_conv2d,
    deform_conv3d,
    deform_conv_transpose1d,
    deform_conv_transpose2d,
    deform_conv_transpose3d,
    mask_sigmoid,
    mask_softmax,
    mask_softmax1d,
    mask_softmax2d,
    mask_softmax3d,
)
from .modules import (
    DeformConv1d,
    DeformConv2d,
    DeformConv3d,
    DeformConvTranspose1d,
    DeformConvTranspose2d,
    DeformConvTranspose3d,
    PackedDeformConv1d,
    PackedDeformConv2d,
    PackedDeformConv3d,
    PackedDeformConvTranspose1d,
    PackedDeformConvTranspose2d,
    PackedDeformConvTranspose3d,
)

__all__ = [
    "has_ops",
    "with_cuda",
    "set_workspace_limit",
    "deform_conv",
    "deform_conv1d",
    "deform_conv2d",
    "deform_conv3d",
    "deform_conv_transpose1d",
    "deform_conv_transpose2d",
    "deform_conv_transpose3d",
    "mask_softmax",
    "mask_softmax1d",
    "mask_softmax2d",
    "mask_softmax3d",
    "mask_sigmoid",
    "DeformConv1d",
    "DeformConv2d",
    "DeformConv3d",
    "DeformConvTranspose1d",
    "DeformConvTranspose2d",
    "DeformConvTranspose3d",
    "PackedDeformConv1d",
    "PackedDeformConv2d",
    "PackedDeformConv3d",
    "PackedDeformConvTranspose1d",
    "PackedDeformConvTranspose2d",
    "PackedDeformConvTranspose3d",
]
