"""Functional API: deformable convolution in 1d, 2d and 3d, plain and transposed, and deformable
RoI pooling (``deform_roi_pool``, mmcv's; ``deform_psroi_pool``, R-FCN's position-sensitive one).

Names and argument order follow tvdcn (``deform_conv2d(input, weight, offset, mask, bias, stride,
padding, dilation, groups)``); the 2d offset/mask layout is torchvision's and mmcv's.

Shapes, with ``N`` spatial dims, kernel ``k = (k_1..k_N)`` and ``K = prod(k)``:

- ``input``: ``(B, C_in, *in)`` or unbatched ``(C_in, *in)``
- ``weight``: ``(C_out, C_in / groups, *k)``; transposed: ``(C_in, C_out / groups, *k)``
- ``offset``: ``(B, offset_groups * N * K, *grid)``: per offset group and kernel point (row-major
  over the kernel), the ``N`` displacements along (d, h, w) in that order
- ``mask``: ``(B, mask_groups * K, *grid)``
- ``bias``: ``(C_out,)``

``grid`` is the output grid for deformable convolution and the input grid for the transposed op.
``offset_groups`` and ``mask_groups`` are read from the channel counts and must divide the channels
that are sampled (``C_in`` for convolution, ``C_out`` for the transposed op).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._library import require_ops

IntOrTuple = Union[int, Sequence[int]]

__all__ = [
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
    "deform_roi_pool",
    "deform_psroi_pool",
]


def _ntuple(value: IntOrTuple, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (tuple, list, torch.Size)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        if len(value) == 1:
            return tuple(value) * n
        if len(value) == n:
            return tuple(value)
    raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")


def deform_conv(
    input: Tensor,
    weight: Tensor,
    offset: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    transposed: bool = False,
    output_padding: IntOrTuple = 0,
) -> Tensor:
    """N-d deformable convolution (N = ``weight.dim() - 2``); see the module docstring for shapes.

    With ``transposed=True`` this is the transposed op: the adjoint of deformable convolution
    with respect to its input, offset and mask living on the input grid.
    """
    require_ops()
    if not isinstance(weight, Tensor) or not 3 <= weight.dim() <= 5:
        raise ValueError(
            "weight must be a tensor of rank 3, 4 or 5 (out, in/groups, *kernel), got "
            f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
        )
    n = weight.dim() - 2
    if not isinstance(input, Tensor):
        raise ValueError(f"input must be a tensor, got {type(input).__name__}")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise ValueError(f"groups must be an int, got {groups!r}")
    stride_ = _ntuple(stride, n, "stride")
    padding_ = _ntuple(padding, n, "padding")
    dilation_ = _ntuple(dilation, n, "dilation")
    output_padding_ = _ntuple(output_padding, n, "output_padding")

    unbatched = input.dim() == n + 1
    if unbatched:
        input = input.unsqueeze(0)
        offset = offset.unsqueeze(0) if offset is not None and offset.dim() == n + 1 else offset
        mask = mask.unsqueeze(0) if mask is not None and mask.dim() == n + 1 else mask
    elif input.dim() != n + 2:
        raise ValueError(
            f"input must have shape (B, C_in, *{n} spatial dims) or (C_in, *{n} spatial dims) for a "
            f"{n}d weight of shape {tuple(weight.shape)}, got shape {tuple(input.shape)}"
        )
    out = torch.ops.dcn_plugin.deform_conv(
        input, weight, offset, mask, bias, stride_, padding_, dilation_, transposed, output_padding_, groups
    )
    return out.squeeze(0) if unbatched else out


def _dimensioned(n: int, transposed: bool):
    """Builds ``deform_conv{n}d`` / ``deform_conv_transpose{n}d`` with tvdcn's signature."""
    rank = n + 2

    def check_rank(weight: Tensor, name: str) -> None:
        if not isinstance(weight, Tensor) or weight.dim() != rank:
            raise ValueError(
                f"{name}: weight must have {rank} dims (out, in/groups, *{n} kernel dims), got "
                f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
            )

    if transposed:

        def op(input, weight, offset=None, mask=None, bias=None, stride=1, padding=0, output_padding=0,
               dilation=1, groups=1):
            check_rank(weight, op.__name__)
            return deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups,
                               transposed=True, output_padding=output_padding)

        op.__name__ = f"deform_conv_transpose{n}d"
        op.__doc__ = f"""{n}d transposed deformable convolution.

        Args:
            input: ``(B, C_in, *in)`` or ``(C_in, *in)``, {n} spatial dims.
            weight: ``(C_in, C_out / groups, *kernel)``.
            offset: ``(B, offset_groups * {n} * K, *in)`` or None (no displacement).
            mask: ``(B, mask_groups * K, *in)`` or None (no modulation).
            bias: ``(C_out,)`` or None.
            stride, padding, output_padding, dilation: int or tuple of {n} ints.
            groups: number of convolution groups.

        Returns:
            ``(B, C_out, *out)`` with ``out = (in - 1) * stride - 2 * padding + dilation * (k - 1)
            + output_padding + 1``.
        """
    else:

        def op(input, weight, offset=None, mask=None, bias=None, stride=1, padding=0, dilation=1, groups=1):
            check_rank(weight, op.__name__)
            return deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups)

        op.__name__ = f"deform_conv{n}d"
        op.__doc__ = f"""{n}d deformable convolution (DCNv1 with offsets, DCNv2 with a mask).

        Args:
            input: ``(B, C_in, *in)`` or ``(C_in, *in)``, {n} spatial dims.
            weight: ``(C_out, C_in / groups, *kernel)``.
            offset: ``(B, offset_groups * {n} * K, *out)`` or None (no displacement).
            mask: ``(B, mask_groups * K, *out)`` or None (no modulation).
            bias: ``(C_out,)`` or None.
            stride, padding, dilation: int or tuple of {n} ints.
            groups: number of convolution groups.

        Returns:
            ``(B, C_out, *out)`` with ``out = (in + 2 * padding - dilation * (k - 1) - 1) // stride + 1``.

        Example:
            >>> x = torch.randn(2, 8, 16, 16)
            >>> w = torch.randn(4, 8, 3, 3)
            >>> off = torch.zeros(2, 2 * 9, 16, 16)
            >>> deform_conv2d(x, w, off, padding=1).shape
            torch.Size([2, 4, 16, 16])
        """
    op.__qualname__ = op.__name__
    return op


deform_conv1d = _dimensioned(1, transposed=False)
deform_conv2d = _dimensioned(2, transposed=False)
deform_conv3d = _dimensioned(3, transposed=False)
deform_conv_transpose1d = _dimensioned(1, transposed=True)
deform_conv_transpose2d = _dimensioned(2, transposed=True)
deform_conv_transpose3d = _dimensioned(3, transposed=True)


def mask_softmax(mask: Tensor, kernel_size: IntOrTuple, n: Optional[int] = None) -> Tensor:
    """DCNv3 mask activation: softmax over the K kernel points of each mask group.

    Args:
        mask: ``(B, mask_groups * K, *grid)`` or unbatched ``(mask_groups * K, *grid)``.
        kernel_size: int or tuple; ``K = prod(kernel_size)``.
        n: number of spatial dims; inferred from ``kernel_size`` when it is a tuple, otherwise
            from ``mask`` (taken as batched).

    Returns:
        A tensor of the shape of ``mask`` whose K values per group and location sum to one.
    """
    if n is None:
        n = len(kernel_size) if isinstance(kernel_size, (tuple, list)) else mask.dim() - 2
    k = 1
    for size in _ntuple(kernel_size, n, "kernel_size"):
        k *= size
    channel_dim = mask.dim() - n - 1
    if channel_dim not in (0, 1):
        raise ValueError(f"mask must have shape (B, mask_groups * K, *{n} dims), got {tuple(mask.shape)}")
    channels = mask.shape[channel_dim]
    if channels == 0 or channels % k != 0:
        raise ValueError(f"mask has {channels} channels, which is not a multiple of K = {k} kernel points")
    grouped = mask.unflatten(channel_dim, (channels // k, k))
    return grouped.softmax(dim=channel_dim + 1).flatten(channel_dim, channel_dim + 1)


def mask_sigmoid(mask: Tensor) -> Tensor:
    """DCNv2 mask activation: an element-wise sigmoid. ``mask``: ``(B, mask_groups * K, *grid)``."""
    return torch.sigmoid(mask)


def _mask_softmax_nd(n: int):
    def op(mask: Tensor, kernel_size: IntOrTuple) -> Tensor:
        return mask_softmax(mask, kernel_size, n)

    op.__name__ = op.__qualname__ = f"mask_softmax{n}d"
    op.__doc__ = f"""Softmax over the K kernel points of each mask group of a {n}d mask.

    Args:
        mask: ``(B, mask_groups * K, *{n} dims)`` or ``(mask_groups * K, *{n} dims)``.
        kernel_size: int or tuple of {n} ints.
    """
    return op


mask_softmax1d = _mask_softmax_nd(1)
mask_softmax2d = _mask_softmax_nd(2)
mask_softmax3d = _mask_softmax_nd(3)


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor],
    output_size: IntOrTuple,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Deformable RoI pooling as mmcv's ``deform_roi_pool`` (same arguments, same results).

    Bin ``(i, j)`` of each RoI averages the input, bilinearly interpolated, at a grid of points
    inside the bin (RoIAlign), the whole bin shifted by ``gamma * offset[r, :, i, j] * (w, h)`` for
    a RoI of width ``w`` and height ``h`` on the feature map. Without an offset this is mmcv's
    RoIAlign (``aligned=True``: RoI corners are moved by half a pixel).

    Args:
        input: ``(B, C, H, W)``.
        rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in image coordinates.
        offset: ``(R, 2, out_h, out_w)`` (x, then y) or None.
        output_size: ``out_h, out_w`` (an int for both).
        spatial_scale: feature-map size over image size (1 / stride).
        sampling_ratio: samples per bin along each axis; 0 takes ``ceil(bin size)`` per RoI.
        gamma: scale of the offsets.

    Returns:
        ``(R, C, out_h, out_w)``.

    Example:
        >>> x = torch.randn(2, 16, 32, 32)
        >>> rois = torch.tensor([[0, 4.0, 4.0, 60.0, 40.0], [1, 0.0, 8.0, 30.0, 30.0]])
        >>> deform_roi_pool(x, rois, None, 7, spatial_scale=0.5).shape
        torch.Size([2, 16, 7, 7])
    """
    require_ops()
    size = list(_ntuple(output_size, 2, "output_size"))
    return torch.ops.dcn_plugin.deform_roi_pool(input, rois, offset, size, float(spatial_scale),
                                                int(sampling_ratio), float(gamma))


def deform_psroi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor],
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: Optional[int] = None,
    sample_per_part: int = 1,
    trans_std: float = 0.0,
) -> Tensor:
    """Deformable position-sensitive RoI pooling as R-FCN / Deformable ConvNets'
    ``DeformablePSROIPooling`` (same arguments; ``offset=None`` is its ``no_trans=True``).

    Output channel ``c`` of bin ``(i, j)`` averages input channel ``(c * G + gi) * G + gj``
    (``gi = i * G // pooled_size``, ``G = group_size``) at ``sample_per_part ** 2`` points of the
    bin, all shifted by ``trans_std * offset[r, 2k:2k+2, pi, pj] * (w, h)`` for the offset class
    ``k = c // (output_dim / classes)`` and part ``pi = i * part_size // pooled_size``. RoI corners are
    rounded to whole image pixels; only samples within half a pixel of the feature map count.

    Args:
        input: ``(B, output_dim * group_size ** 2, H, W)``.
        rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in image coordinates.
        offset: ``(R, 2 * classes, part_size, part_size)`` (per class: x, then y), ``classes``
            dividing ``output_dim``; or None (no offsets).
        spatial_scale: feature-map size over image size (1 / stride).
        output_dim: output channels.
        group_size: position-sensitive groups per side.
        pooled_size: bins per side.
        part_size: offset parts per side (default ``pooled_size``).
        sample_per_part: samples per bin along each axis.
        trans_std: scale of the offsets.

    Returns:
        ``(R, output_dim, pooled_size, pooled_size)``.
    """
    require_ops()
    part_size = pooled_size if part_size in (None, 0) else part_size  # R-FCN: 0 means pooled_size
    return torch.ops.dcn_plugin.deform_psroi_pool(input, rois, offset, float(spatial_scale), output_dim,
                                                  group_size, pooled_size, part_size, sample_per_part,
                                                  float(trans_std))
