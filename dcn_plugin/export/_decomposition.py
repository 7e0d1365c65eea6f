"""Deformable convolution from standard ONNX ops, for the cases without a standard op (3d, transposed).

Shapes (names as in :class:`dcn_plugin.ops.shapes.DeformConvShape`): N spatial dims, K kernel
points, P points of the grid where offset and mask live (the output of the convolution, the input
of the transposed op), S points of the image, the tensor that is sampled (the input of the
convolution, the output of the transposed op), G = ``sample_groups`` groups of ``Cg`` image
channels that share one offset and one mask.

1. Positions, per dim d: ``p_d * stride_d - padding_d + k_d * dilation_d + offset_d``, (B, G, K, P).
2. The ``2^N`` corners of every position: a flat image index (clamped into the image) and a
   weight, the product of the per-dim linear weights, times the mask, zero where the corner lies
   outside the image (so outside reads zero, as in the op).
3. Convolution: ``GatherND`` of the image (B, G, S, Cg) at each corner, weighted and summed into
   columns (B, G, K*P, Cg), then one ``MatMul`` with the weight per convolution group.
   Transposed: the ``MatMul`` first, (B, G, K*P, Cg), then ``ScatterND(reduction='add')`` of each
   corner's weighted share onto a zero image: the adjoint of the sampling.

Positions and sums are in float32 (float64 for double inputs), as in the op; half inputs are cast
up and the output cast back.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from onnxscript import ir

from ..ops.shapes import DeformConvShape, accumulate_dtype, conv_output_size
from ._graph import ints, repeat_groups, zeros

__all__ = ["deform_conv"]

# The op's dtypes, as ONNX and torch name them.
_TORCH_DTYPES = {ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
                 ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64}
_ONNX_DTYPES = {torch_dtype: onnx_dtype for onnx_dtype, torch_dtype in _TORCH_DTYPES.items()}


def deform_conv(op, g: DeformConvShape, input, weight, offset, mask, bias):
    """The op's output (B, C_out, *out) from standard ops; arguments as the exporter passes them."""
    dtype = input.dtype
    compute = _ONNX_DTYPES[accumulate_dtype(_TORCH_DTYPES.get(dtype, torch.float32))]

    def cast(t):
        return t if t is None or dtype == compute else op.Cast(t, to=compute)

    input, weight, offset, mask, bias = map(cast, (input, weight, offset, mask, bias))
    grid = op.Shape(input, start=2) if g.transposed else op.Shape(offset if offset is not None else mask,
                                                                  start=2)
    image_size = _transposed_size(op, g, input) if g.transposed else op.Shape(input, start=2)
    positions = _positions(op, g, input, offset, grid, compute)
    scale = None
    if mask is not None:  # (B, G, K, P)
        scale = op.Reshape(repeat_groups(op, mask, g.mask_groups, g.sample_groups),
                           ints(op, 0, g.sample_groups, g.kernel_points, -1))
    corners = list(_corners(op, positions, image_size, scale))
    if g.transposed:
        out = _scatter(op, g, input, weight, corners, image_size)
        out_grid = image_size
    else:
        out = _gather(op, g, input, weight, corners)
        out_grid = grid
    out = op.Reshape(out, op.Concat(op.Shape(input, end=1), ints(op, g.out_channels), out_grid, axis=0))
    if bias is not None:
        out = op.Add(out, op.Reshape(bias, ints(op, g.out_channels, *[1] * g.n)))
    return out if dtype == compute else op.Cast(out, to=dtype)


def _transposed_size(op, g: DeformConvShape, input):
    """The transposed op's output size per dim, a 1-D int64 value: ``conv_output_size`` is
    ``(in - 1) * stride`` plus what it is for ``in = 1``."""
    at_one = [conv_output_size(1, k, s, p, d, True, o)
              for k, s, p, d, o in zip(g.kernel, g.stride, g.padding, g.dilation, g.output_padding)]
    steps = op.Mul(op.Sub(op.Shape(input, start=2), ints(op, 1)), ints(op, *g.stride))
    return op.Add(steps, ints(op, *at_one))


def _positions(op, g: DeformConvShape, input, offset, grid, compute) -> List:
    """Per spatial dim, the sampling positions (B, G, K, P) in ``compute`` dtype."""
    n, k, groups = g.n, g.kernel_points, g.sample_groups
    taps = np.indices(g.kernel).reshape(n, k)  # row-major kernel points
    if offset is not None:  # (B, G, K, N, P): channel (group * K + k) * N + d
        offset = op.Reshape(repeat_groups(op, offset, g.offset_groups, groups), ints(op, 0, groups, k, n, -1))
    positions = []
    for d in range(n):
        size = op.Gather(grid, op.Constant(value_int=d))
        line = op.Cast(op.Range(op.Constant(value_int=0), size, op.Constant(value_int=1)), to=compute)
        line_shape = [1] * n
        line_shape[d] = -1
        line = op.Reshape(op.Sub(op.Mul(line, float(g.stride[d])), float(g.padding[d])),
                          ints(op, 1, *line_shape))  # (1, ..., grid_d, ..., 1)
        kernel = op.Cast(ints(op, *(taps[d] * g.dilation[d]).tolist()), to=compute)
        kernel = op.Reshape(kernel, ints(op, k, *[1] * n))  # (K, 1, ..., 1)
        base = op.Expand(op.Add(kernel, line), op.Concat(ints(op, k), grid, axis=0))
        base = op.Reshape(base, ints(op, k, -1))  # (K, P)
        if offset is None:
            position = op.Expand(base, op.Concat(op.Shape(input, end=1), ints(op, groups, 1, 1), axis=0))
        else:
            position = op.Add(base, op.Gather(offset, op.Constant(value_int=d), axis=3))
        positions.append(position)
    return positions


def _corners(op, positions: List, image_size, scale) -> Iterator[Tuple]:
    """Yields, for each of the ``2^N`` corners, the flat image index (B, G, K*P, 1) int64, clamped
    into the image, and its weight (B, G, K*P, 1): the N-linear weight times ``scale`` (the mask,
    (B, G, K, P), or None), zero where the corner lies outside the image."""
    n = len(positions)
    lows = [op.Floor(p) for p in positions]
    highs_weight = [op.Sub(p, low) for p, low in zip(positions, lows)]
    lows_weight = [op.Sub(op.CastLike(op.Constant(value_float=1.0), w), w) for w in highs_weight]
    lows = [op.Cast(low, to=ir.DataType.INT64) for low in lows]
    sizes = [op.Gather(image_size, op.Constant(value_int=d)) for d in range(n)]
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    flat_shape = ints(op, 0, 0, -1, 1)
    for corner in range(2**n):
        flat = inside = weight = None
        for d in range(n):
            bit = corner >> d & 1  # as in csrc/sampling.h: bit d picks the upper neighbour along dim d
            index = op.Add(lows[d], one) if bit else lows[d]
            ok = op.And(op.GreaterOrEqual(index, zero), op.Less(index, sizes[d]))
            clamped = op.Clip(index, zero, op.Sub(sizes[d], one))
            corner_weight = highs_weight[d] if bit else lows_weight[d]
            flat = clamped if flat is None else op.Add(op.Mul(flat, sizes[d]), clamped)
            inside = ok if inside is None else op.And(inside, ok)
            weight = corner_weight if weight is None else op.Mul(weight, corner_weight)
        if scale is not None:
            weight = op.Mul(weight, scale)
        weight = op.Where(inside, weight, zeros(op, weight, ints(op, 1)))
        yield op.Reshape(flat, flat_shape), op.Reshape(weight, flat_shape)


def _gather(op, g: DeformConvShape, input, weight, corners):
    """Convolution: (B, groups, C_out / groups, P)."""
    groups, cg, k = g.sample_groups, g.channels_per_sample_group, g.kernel_points
    image = op.Transpose(op.Reshape(input, ints(op, 0, groups, cg, -1)), perm=[0, 1, 3, 2])  # (B, G, S, Cg)
    columns: Optional[object] = None
    for index, corner_weight in corners:
        sample = op.Mul(op.GatherND(image, index, batch_dims=2), corner_weight)  # (B, G, K*P, Cg)
        columns = sample if columns is None else op.Add(columns, sample)
    columns = op.Transpose(op.Reshape(columns, ints(op, 0, groups, k, -1, cg)), perm=[0, 1, 4, 2, 3])
    group_in = g.in_channels // g.groups
    columns = op.Reshape(columns, ints(op, 0, g.groups, group_in * k, -1))  # (B, groups, C_in/groups * K, P)
    w = op.Reshape(weight, ints(op, g.groups, g.out_channels // g.groups, group_in * k))
    return op.MatMul(w, columns)


def _scatter(op, g: DeformConvShape, input, weight, corners, image_size):
    """Transposed: (B, G, Cg, S) sums of every kernel point's share, onto the output (the image)."""
    groups, cg, k = g.sample_groups, g.channels_per_sample_group, g.kernel_points
    group_in, group_out = g.in_channels // g.groups, g.out_channels // g.groups
    x = op.Reshape(input, ints(op, 0, g.groups, group_in, -1))  # (B, groups, C_in/groups, P)
    w = op.Transpose(op.Reshape(weight, ints(op, g.groups, group_in, group_out * k)), perm=[0, 2, 1])
    values = op.Reshape(op.MatMul(w, x), ints(op, 0, groups, cg, k, -1))  # (B, G, Cg, K, P)
    updates = op.Reshape(op.Transpose(values, perm=[0, 1, 3, 4, 2]), ints(op, 0, groups, -1, cg))
    batch = op.Shape(input, end=1)
    size = op.ReduceProd(image_size, keepdims=1)
    out = zeros(op, updates, op.Concat(batch, ints(op, groups), size, ints(op, cg), axis=0))  # (B, G, S, Cg)
    batch_group = None
    for index, corner_weight in corners:
        if batch_group is None:
            batch_group = _batch_group_index(op, index, groups)
        where = op.Concat(batch_group, index, axis=-1)  # (B, G, K*P, 3): batch item, group, image point
        out = op.ScatterND(out, where, op.Mul(updates, corner_weight), reduction="add")
    return op.Transpose(out, perm=[0, 1, 3, 2])


def _batch_group_index(op, index, groups: int):
    """(B, G, K*P, 2): the batch item and the group of every entry of ``index`` (B, G, K*P, 1)."""
    shape = op.Shape(index)
    batch_size = op.Gather(shape, op.Constant(value_int=0))
    items = op.Reshape(op.Range(op.Constant(value_int=0), batch_size, op.Constant(value_int=1)),
                       ints(op, -1, 1, 1, 1))
    group_ids = op.Reshape(ints(op, *range(groups)), ints(op, 1, -1, 1, 1))
    return op.Concat(op.Expand(items, shape), op.Expand(group_ids, shape), axis=-1)
