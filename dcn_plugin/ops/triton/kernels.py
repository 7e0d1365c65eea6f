"""The Triton sampling kernel of ``dcn_plugin::deform_conv``, and its launcher.

Terms (as in :class:`dcn_plugin.ops.shapes.DeformConvShape`): the *image* is the tensor sampled at
deformed positions (the input of the convolution, the output of the transposed one); the *grid*
holds the points where offset and mask are given; a *column* is one (batch item, grid point) pair,
so the columns of a call are ``B * L`` for ``L`` grid points, as in im2col.

One kernel does every sampling step the driver needs (see ``driver.py`` for the algebra), picked
by constexpr flags, so that a backward pass reads each sample once:

- ``COLUMNS``: im2col, ``columns[channel * K + k, column] = mask * sample(image[channel], position)``;
- ``SCATTER``: col2im, ``grad_image[channel] += mask * grad_columns[channel * K + k, column]``,
  spread over the corners of the sample (``tl.atomic_add``: two samples may share a corner);
- ``OFFSET_GRAD`` / ``MASK_GRAD``: the gradients of the offset and the mask, from ``grad_columns``:
  each program sums over its channels in a fixed order and writes one partial sum per tile of
  channels (``partial``); the driver adds those up in a fixed order, so the result is deterministic.

A program covers one kernel point, ``BLOCK_COLUMNS`` columns and a tile of ``BLOCK_CHANNELS``
channels that lie in one offset group and one mask group. A launch covers the columns
``[first_column, first_column + width)``, which may span several batch items (one matrix product
for all of them). The sampling position and its corners are computed once per column and reused by
every channel of the tile. Spatial sizes are padded on the left to 3 dims (of size 1); ``N`` (a
constexpr) says how many of the last dims are real, and only those are interpolated.

Positions, corner weights and sums are in ``ACC`` (:func:`dcn_plugin.ops.shapes.accumulate_dtype`);
values are read in the tensors' dtype. Indices are int32 unless ``WIDE`` (int64), which the
launcher sets only where some tensor or index of the launch reaches 2^31 (:func:`needs_wide_index`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..shapes import DeformConvShape, accumulate_dtype

INT32_LIMIT = 2**31


@triton.jit
def _axis(pos, size):
    """One axis of a position: lower neighbour, fraction, whether the lower and upper neighbours
    lie in ``[0, size)``. A position outside ``(-1, size)`` (or NaN) touches nothing."""
    touches = (pos > -1.0) & (pos < size)
    pos = tl.where(touches, pos, 0.0)
    low = tl.floor(pos)
    # The neighbours' bounds are tested on `low` (a whole number), not on the integer index: with the
    # index shared between these tests and the addresses, Triton 3.7.1's layout-conversion pass breaks
    # the AMD build of some launches (fp64, 1d, scatter: "operand #0 does not dominate this use").
    return low.to(tl.int32), pos - low, touches & (low >= 0.0), touches & (low < size - 1.0)


@triton.jit
def _unravel(index, size2, size1):
    """The three coordinates of a row-major index over ``(size0, size1, size2)``."""
    return index // (size2 * size1), index // size2 % size1, index % size2


# column_stride is left out: the launcher rounds it up to a multiple of COLUMN_ALIGN, and Triton's
# specialization on "divisible by 16" then lets the compiler vectorise the column loads and stores.
_INTEGER_ARGUMENTS = [
    "first_column", "width", "channels", "channels_per_offset_group", "channels_per_mask_group",
    "channels_per_sample_group", "tiles_per_sample_group", "offset_channels", "mask_channels", "K", "L",
    "image_size0", "image_size1", "image_size2", "grid_size1", "grid_size2", "kernel_size1", "kernel_size2",
    "stride0", "stride1", "stride2", "pad0", "pad1", "pad2", "dil0", "dil1", "dil2",
]


# Integers other than column_stride are not specialized (on being 1 or a multiple of 16): shapes
# change from call to call (detectors see images of many sizes), and each specialization would be a
# compilation of its own.
@triton.jit(do_not_specialize=_INTEGER_ARGUMENTS)
def sample_kernel(
    image, offset, mask, grad_columns, columns, grad_image, partial,
    first_column, width, column_stride,
    channels, channels_per_offset_group, channels_per_mask_group, channels_per_sample_group,
    tiles_per_sample_group, offset_channels, mask_channels, K, L,
    image_size0, image_size1, image_size2, grid_size1, grid_size2, kernel_size1, kernel_size2,
    stride0, stride1, stride2, pad0, pad1, pad2, dil0, dil1, dil2,
    N: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MASK: tl.constexpr, COLUMNS: tl.constexpr,
    SCATTER: tl.constexpr, OFFSET_GRAD: tl.constexpr, MASK_GRAD: tl.constexpr, ACC: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_CHANNELS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):
    """See the module docstring. Shapes (``P`` image points, ``L`` grid points, ``T`` tiles of
    channels): image ``(B, C, P)``, offset ``(B, offset_channels, L)``, mask ``(B, mask_channels, L)``,
    columns and grad_columns ``(C * K, column_stride)``, grad_image ``(B, C, P)`` in ``ACC``,
    partial ``(T, K, N + 1, width)`` in ``ACC``."""
    # Programs along axis 0 run over the blocks of columns, then over the tiles of channels (CUDA
    # allows 2^31 - 1 programs along axis 0, 65535 along the others); axis 1 is the kernel point.
    column_blocks = tl.cdiv(width, BLOCK_COLUMNS)
    tile = tl.program_id(0) // column_blocks
    # column: position within this launch's columns; flat_column: within all columns of the call
    column = tl.program_id(0) % column_blocks * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    k = tl.program_id(1)
    if WIDE:
        column = column.to(tl.int64)
        k = k.to(tl.int64)
        tile = tile.to(tl.int64)
    column_ok = column < width
    flat_column = first_column + column
    b = flat_column // L
    l = flat_column % L

    # The tile's channels: part of one sample group (channels that share one offset group and one
    # mask group) of `channels_per_sample_group` channels.
    sample_group = tile // tiles_per_sample_group
    in_group = (tile % tiles_per_sample_group) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_ok = in_group < channels_per_sample_group
    first_channel = sample_group * channels_per_sample_group
    channel = first_channel + in_group
    offset_group = first_channel // channels_per_offset_group
    mask_group = first_channel // channels_per_mask_group
    ok = channel_ok[:, None] & column_ok[None, :]

    # Position sampled by kernel point k at grid point l, per axis (padded axes stay at 0).
    p0, p1, p2 = _unravel(l, grid_size2, grid_size1)
    k0, k1, k2 = _unravel(k, kernel_size2, kernel_size1)
    pos2 = (p2 * stride2 - pad2 + k2 * dil2).to(ACC)
    pos1 = (p1 * stride1 - pad1 + k1 * dil1).to(ACC)
    pos0 = (p0 * stride0 - pad0 + k0 * dil0).to(ACC)
    if HAS_OFFSET:
        # channel (offset_group * K + k) * N + d holds the displacement along real dim d
        row = (b * offset_channels + (offset_group * K + k) * N) * L + l
        pos2 += tl.load(offset + row + (N - 1) * L, mask=column_ok, other=0.0).to(ACC)
        if N >= 2:
            pos1 += tl.load(offset + row + (N - 2) * L, mask=column_ok, other=0.0).to(ACC)
        if N >= 3:
            pos0 += tl.load(offset + row, mask=column_ok, other=0.0).to(ACC)
    if HAS_MASK:
        modulation = tl.load(mask + (b * mask_channels + mask_group * K + k) * L + l, mask=column_ok,
                             other=0.0).to(ACC)
    else:
        modulation = tl.full((BLOCK_COLUMNS,), 1.0, ACC)
    low2, frac2, low_in2, high_in2 = _axis(pos2, image_size2)
    low1, frac1, low_in1, high_in1 = _axis(pos1, image_size1)
    low0, frac0, low_in0, high_in0 = _axis(pos0, image_size0)
    if WIDE:
        low2 = low2.to(tl.int64)
        low1 = low1.to(tl.int64)
        low0 = low0.to(tl.int64)
    one = tl.full((BLOCK_COLUMNS,), 1.0, ACC)

    image_plane = (b[None, :] * channels + channel[:, None]) * (image_size0 * image_size1 * image_size2)
    column_index = (channel[:, None] * K + k) * column_stride + column[None, :]
    # Boolean chains are parenthesised in pairs: Triton 3.0-3.3 reject `A or B or C`.
    GATHER: tl.constexpr = COLUMNS or (OFFSET_GRAD or MASK_GRAD)
    if SCATTER or (OFFSET_GRAD or MASK_GRAD):
        grad = tl.load(grad_columns + column_index, mask=ok, other=0.0).to(ACC)
    value = tl.zeros((BLOCK_CHANNELS, BLOCK_COLUMNS), ACC)
    slope2 = tl.zeros((BLOCK_CHANNELS, BLOCK_COLUMNS), ACC)
    slope1 = tl.zeros((BLOCK_CHANNELS, BLOCK_COLUMNS), ACC)
    slope0 = tl.zeros((BLOCK_CHANNELS, BLOCK_COLUMNS), ACC)
    for corner in tl.static_range(1 << N):
        # As in csrc/sampling.h, bit d of `corner` picks the upper neighbour along real dim d (dim 0
        # first); real dim d is padded axis 3 - N + d, so axis 2 is bit N - 1, axis 1 bit N - 2, axis 0
        # bit 0. Per axis: the interpolation factor, whether the neighbour is inside, the factor's
        # derivative (+-1). The corner's weight is the product of the factors; dweight2, dweight1,
        # dweight0 are its derivatives along the axes.
        if corner >> (N - 1) & 1:
            corner_weight, inside, dweight2 = frac2, high_in2, one
        else:
            corner_weight, inside, dweight2 = 1.0 - frac2, low_in2, -one
        corner_point = low2 + (corner >> (N - 1) & 1)
        dweight1 = corner_weight
        dweight0 = corner_weight
        if N >= 2:
            if corner >> (N - 2) & 1:
                factor, inside_axis, sign = frac1, high_in1, one
            else:
                factor, inside_axis, sign = 1.0 - frac1, low_in1, -one
            dweight2 = dweight2 * factor
            dweight1 = corner_weight * sign
            corner_weight = corner_weight * factor
            inside = inside & inside_axis
            corner_point += (low1 + (corner >> (N - 2) & 1)) * image_size2
        if N >= 3:
            if corner & 1:
                factor, inside_axis, sign = frac0, high_in0, one
            else:
                factor, inside_axis, sign = 1.0 - frac0, low_in0, -one
            dweight2 = dweight2 * factor
            dweight1 = dweight1 * factor
            dweight0 = corner_weight * sign
            corner_weight = corner_weight * factor
            inside = inside & inside_axis
            corner_point += (low0 + (corner & 1)) * (image_size1 * image_size2)
        corner_ok = ok & inside[None, :]
        corner_index = image_plane + corner_point[None, :]
        if GATHER:
            corner_value = tl.load(image + corner_index, mask=corner_ok, other=0.0).to(ACC)
            value += corner_weight[None, :] * corner_value
            if OFFSET_GRAD:
                slope2 += dweight2[None, :] * corner_value
                if N >= 2:
                    slope1 += dweight1[None, :] * corner_value
                if N >= 3:
                    slope0 += dweight0[None, :] * corner_value
        if SCATTER:
            # relaxed: a pure scatter, nothing reads the sums before the kernel ends, so no ordering
            # (the default acq_rel costs a fence per add, on AMD most of all)
            tl.atomic_add(grad_image + corner_index, (corner_weight * modulation)[None, :] * grad,
                          mask=corner_ok, sem="relaxed")

    if COLUMNS:
        tl.store(columns + column_index, (value * modulation[None, :]).to(columns.dtype.element_ty), mask=ok)
    partial_index = ((tile * K + k) * (N + 1)) * width + column
    if OFFSET_GRAD:
        tl.store(partial + partial_index + (N - 1) * width, tl.sum(grad * slope2, axis=0) * modulation,
                 mask=column_ok)
        if N >= 2:
            tl.store(partial + partial_index + (N - 2) * width, tl.sum(grad * slope1, axis=0) * modulation,
                     mask=column_ok)
        if N >= 3:
            tl.store(partial + partial_index, tl.sum(grad * slope0, axis=0) * modulation, mask=column_ok)
    if MASK_GRAD:
        tl.store(partial + partial_index + N * width, tl.sum(grad * value, axis=0), mask=column_ok)


def needs_wide_index(*extents: int) -> bool:
    """Whether an index as large as the largest of ``extents`` (element counts of the tensors a
    launch touches, and any other index it forms) needs 64 bits."""
    return max(extents, default=0) >= INT32_LIMIT


@dataclasses.dataclass
class Launch:
    """One launch of :func:`sample_kernel` over the columns ``[first_column, first_column + width)``.

    ``image`` ``(B, C, *image_size)``; ``offset``, ``mask`` as the op takes them (contiguous);
    ``columns`` / ``grad_columns`` ``(C * K, width)`` in the input's dtype (row stride ``stride(0)``,
    a multiple of COLUMN_ALIGN where the compiler should vectorise), ``grad_image``
    ``(B, C, *image_size)`` and ``partial`` ``(tiles, K, N + 1, width)`` in the accumulation dtype.
    Tensors that are None are neither read nor written.
    """

    conv: DeformConvShape
    first_column: int
    width: int
    image: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    columns: Optional[torch.Tensor] = None
    grad_columns: Optional[torch.Tensor] = None
    grad_image: Optional[torch.Tensor] = None
    partial: Optional[torch.Tensor] = None
    offset_grad: bool = False
    mask_grad: bool = False
    wide_index: Optional[bool] = None  # None: chosen from the extents; True/False: forced


BLOCK_COLUMNS = 64
# The row stride of column buffers (in elements) is a multiple of this: with it, Triton's "divisible
# by 16" specialization of ``column_stride`` tells the compiler that each row of a tile starts on a
# 16-element boundary, so column loads and stores can be vector instructions.
COLUMN_ALIGN = 16
# Fused multiply-adds in the interpolation and the sums, passed explicitly at every launch: Triton 3.9
# warns when neither this nor TRITON_DEFAULT_FP_FUSION says it, and its default turns off in 3.10.
FP_FUSION = True
#: The Triton type of each accumulation dtype (:func:`dcn_plugin.ops.shapes.accumulate_dtype`).
TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def column_stride(width: int) -> int:
    """The row stride of a column buffer of ``width`` columns: ``width`` rounded up to COLUMN_ALIGN."""
    return triton.cdiv(max(width, 1), COLUMN_ALIGN) * COLUMN_ALIGN


def block_channels(conv: DeformConvShape) -> int:
    """Channels per program: a power of two up to 16, no more than a sample group holds."""
    return min(16, triton.next_power_of_2(max(conv.channels_per_sample_group, 1)))


def sample_warps(channels_per_program: int) -> int:
    """Warps per program of :func:`sample_kernel`: one per 256 elements of its
    ``(BLOCK_CHANNELS, BLOCK_COLUMNS)`` tile (8 per thread), 1 to 4, so that small channel tiles do not
    leave most threads idle."""
    return max(1, min(4, channels_per_program * BLOCK_COLUMNS // 256))


def partial_rows(conv: DeformConvShape) -> int:
    """Tiles of channels over the image (the first dim of ``Launch.partial``)."""
    per_group = triton.cdiv(conv.channels_per_sample_group, block_channels(conv))
    return conv.sample_groups * per_group


def launch_extents(launch: Launch) -> tuple:
    """Element counts of everything the launch indexes, for :func:`needs_wide_index`."""
    g = launch.conv
    stride = max(launch.width, 1)
    for t in (launch.columns, launch.grad_columns):
        if t is not None:
            stride = max(stride, t.stride(0))
    rows = g.image_channels * g.kernel_points
    return (g.batch * g.image_channels * g.image_points, g.batch * g.offset_channels * g.grid_points,
            g.batch * g.mask_channels * g.grid_points, g.batch * g.grid_points + BLOCK_COLUMNS,
            rows * stride + BLOCK_COLUMNS,
            partial_rows(g) * g.kernel_points * (g.n + 1) * launch.width + BLOCK_COLUMNS)


def _padded(values: Sequence[int], fill: int) -> Tuple[int, int, int]:
    """``values`` (one per spatial dim) padded on the left to 3 dims with ``fill``."""
    return (fill,) * (3 - len(values)) + tuple(values)


def sample(launch: Launch) -> None:
    """Runs :func:`sample_kernel` for ``launch`` (nothing when there is nothing to sample)."""
    g = launch.conv
    if launch.width == 0 or g.image_channels == 0 or g.kernel_points == 0:
        return
    wide = launch.wide_index
    if wide is None:
        wide = needs_wide_index(*launch_extents(launch))
    present = (launch.image, launch.grad_columns, launch.columns, launch.grad_image)
    placeholder = next(t for t in present if t is not None)  # passed for absent tensors, never touched
    if not placeholder.is_cuda and isinstance(sample_kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("dcn_plugin's Triton kernels run on CPU tensors only under Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before triton is first imported")
    acc = TRITON_DTYPES[accumulate_dtype(placeholder.dtype)]
    stride = next((t.stride(0) for t in (launch.columns, launch.grad_columns) if t is not None), 0)
    block = block_channels(g)
    programs = (triton.cdiv(launch.width, BLOCK_COLUMNS) * partial_rows(g), g.kernel_points)

    def pointer(t):
        return placeholder if t is None else t

    sample_kernel[programs](
        pointer(launch.image), pointer(launch.offset), pointer(launch.mask), pointer(launch.grad_columns),
        pointer(launch.columns), pointer(launch.grad_image), pointer(launch.partial),
        launch.first_column, launch.width, stride,
        g.image_channels, g.channels_per_offset_group, g.channels_per_mask_group, g.channels_per_sample_group,
        triton.cdiv(g.channels_per_sample_group, block), g.offset_channels, g.mask_channels, g.kernel_points,
        g.grid_points, *_padded(g.image_size, 1), *_padded(g.grid_size, 1)[1:], *_padded(g.kernel, 1)[1:],
        *_padded(g.stride, 1), *_padded(g.padding, 0), *_padded(g.dilation, 1),
        N=g.n, HAS_OFFSET=launch.offset is not None, HAS_MASK=launch.mask is not None,
        COLUMNS=launch.columns is not None, SCATTER=launch.grad_image is not None,
        OFFSET_GRAD=launch.offset_grad, MASK_GRAD=launch.mask_grad, ACC=acc, WIDE=wide,
        BLOCK_CHANNELS=block, BLOCK_COLUMNS=BLOCK_COLUMNS, num_warps=sample_warps(block),
        enable_fp_fusion=FP_FUSION,
    )
