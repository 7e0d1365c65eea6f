"""Extents of one call of the op, as the Triton driver and kernel use them.

Roles, as in the C++ driver (``csrc/deform_conv.h``): the *image* is the tensor that is sampled
at deformed positions (the input of deformable convolution, the output of the transposed op);
the *grid* is where offsets and masks live and where columns are laid out (the output grid of
convolution, the input grid of the transposed op).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

from torch import Tensor

from ..shapes import deform_conv_output_shape


@dataclasses.dataclass(frozen=True)
class Geometry:
    dims: int
    batch: int
    groups: int
    image_channels: int  # C_image, channels of the sampled tensor
    grid_channels: int  # channels of the dense tensor on the grid
    image_size: Tuple[int, ...]
    grid_size: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    offset_groups: int  # 0: no offset
    mask_groups: int  # 0: no mask
    output_shape: Tuple[int, ...]

    @staticmethod
    def of(input: Tensor, weight: Tensor, offset: Optional[Tensor], mask: Optional[Tensor],
           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], transposed: bool,
           output_padding: Sequence[int], groups: int) -> Geometry:
        """The geometry of arguments that the op's C++ checks have accepted."""
        n = weight.dim() - 2
        k = math.prod(weight.shape[2:])
        output_shape = tuple(deform_conv_output_shape(input.shape, weight.shape, stride, padding, dilation,
                                                      transposed, output_padding, groups))
        in_size, out_size = tuple(input.shape[2:]), output_shape[2:]
        in_channels, out_channels = input.shape[1], output_shape[1]
        return Geometry(
            dims=n, batch=input.shape[0], groups=groups,
            image_channels=out_channels if transposed else in_channels,
            grid_channels=in_channels if transposed else out_channels,
            image_size=out_size if transposed else in_size, grid_size=in_size if transposed else out_size,
            kernel_size=tuple(weight.shape[2:]), stride=tuple(stride), padding=tuple(padding),
            dilation=tuple(dilation),
            offset_groups=0 if offset is None else offset.shape[1] // (n * k),
            mask_groups=0 if mask is None else mask.shape[1] // k, output_shape=output_shape,
        )

    @property
    def kernel_points(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def grid_points(self) -> int:
        return math.prod(self.grid_size)

    @property
    def image_points(self) -> int:
        return math.prod(self.image_size)

    @property
    def image_shape(self) -> Tuple[int, ...]:
        """``(B, C_image, *image_size)``."""
        return (self.batch, self.image_channels, *self.image_size)

    @property
    def offset_channels(self) -> int:
        return self.offset_groups * self.dims * self.kernel_points

    @property
    def mask_channels(self) -> int:
        return self.mask_groups * self.kernel_points

    @property
    def per_offset_group(self) -> int:
        """Image channels per offset group (all of them without offsets)."""
        return self.image_channels // max(self.offset_groups, 1)

    @property
    def per_mask_group(self) -> int:
        return self.image_channels // max(self.mask_groups, 1)

    @property
    def tile_groups(self) -> int:
        """The coarsest split of the image channels into runs that each lie within one offset
        group and one mask group: the kernel's channel tiles never straddle two runs."""
        return math.lcm(max(self.offset_groups, 1), max(self.mask_groups, 1))

    @property
    def tile_group_channels(self) -> int:
        return self.image_channels // self.tile_groups

    def padded(self, values: Sequence[int], fill: int) -> Tuple[int, int, int]:
        """``values`` (one per spatial dim) padded on the left to 3 dims with ``fill``."""
        return (fill,) * (3 - self.dims) + tuple(values)
