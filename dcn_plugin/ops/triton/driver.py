"""The Triton implementation of ``dcn_plugin::deform_conv`` and ``dcn_plugin::deform_conv_backward``.

The algebra is the C++ CPU driver's (``csrc/cpu/deform_conv_driver.cpp``). The *image* is the tensor that is
sampled (the input of the convolution, the output of the transposed one) and the *grid* holds the
points where offset and mask are given (see :class:`dcn_plugin.ops.shapes.DeformConvShape`); the
*dense* tensor is the one on the grid that is not sampled (grad_output of the convolution, the input
of the transposed one). With the weight viewed as ``W (groups, C_grid / groups, C_image / groups * K)``
and columns ``(C_image * K, B * L)`` (one column per batch item and grid point, as in im2col):

- convolution: ``out = W @ im2col(input)``; transposed: ``out = col2im(W^T @ input)``;
- ``d weight = dense @ im2col(image)^T``;
- ``d offset, d mask``: the derivatives of sampling the image with respect to the sampling
  positions and the mask, against ``W^T @ dense``;
- ``d input = col2im(W^T @ grad_out)`` for convolution, ``W @ im2col(grad_out)`` for transposed.

Sampling is :func:`kernels.sample` (Triton); matrix products are ``torch.bmm`` (cuBLAS on a
GPU). The columns are cut into chunks whose buffers fit the workspace limit
(``dcn_plugin.ops.set_workspace_limit``), so any batch and image size runs in bounded memory, and
small images share one matrix product.

dtypes: columns are stored in the input's dtype, and the matrix products run in it: for
float16/bfloat16 that is cuBLAS (hipBLAS on ROCm) on tensor cores with float32 accumulation, with
half the column memory of float32 columns (torchvision and mmcv keep their columns in the input
dtype too). Sampling positions, interpolation, the offset and mask gradients and every sum across
chunks or samples (the scatter onto the image, the weight gradient over chunks) are in
:func:`~dcn_plugin.ops.shapes.accumulate_dtype` (float32, float64 for double). With each sample
rounded to the half type, the error against float64 is at most 1.45x (float16) and 1.29x (bfloat16)
that of plain convolution in the same dtype on the tests' cases (``tests/half_error_ratios.py``); the
bound for half-type columns is 3x. float32 products use TF32 tensor cores where
the user allows it (``torch.backends.cuda.matmul.allow_tf32``).

These functions take the op's arguments, run the op's C++ argument checks first, and work on
CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is
how the tests check the kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..shapes import DeformConvShape, accumulate_dtype
from .kernels import Launch, column_stride, partial_rows, sample


def workspace_limit() -> int:
    """The column-buffer budget in bytes (shared with the CPU kernels)."""
    return int(torch.ops.dcn_plugin._workspace_limit())


def chunk_width(g: DeformConvShape, dtype: torch.dtype, column_buffers: int, coordinates: bool) -> int:
    """Columns per chunk, so that ``column_buffers`` column buffers (and, with ``coordinates``, the
    partial sums of the offset and mask gradients) fit the workspace limit; at least one."""
    per_column = column_buffers * g.image_channels * g.kernel_points * dtype.itemsize
    if coordinates:
        per_column += partial_rows(g) * g.kernel_points * (g.n + 1) * accumulate_dtype(dtype).itemsize
    return max(1, workspace_limit() // max(per_column, 1))


def alert_scatter(what: str, op: str = "dcn_plugin::deform_conv",
                  deterministic: str = "the offset, mask and weight gradients") -> None:
    """The scatter onto the image uses atomic adds; say so under deterministic mode (``deterministic``:
    what the op computes deterministically on CUDA)."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{op} (Triton kernels, used on CUDA): {what} is scattered with atomic "
               "adds, which is not deterministic, and there is no deterministic implementation, but "
               "torch.use_deterministic_algorithms(True) is set. The CPU op is deterministic; on CUDA, "
               f"{deterministic} are.")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def device_guard(t: Tensor):
    """Makes ``t``'s GPU the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _as_columns(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, C, *grid) -> (C, B * L)`` in ``dtype``: the columns of all batch items side by side."""
    batch, channels, points = t.shape[0], t.shape[1], math.prod(t.shape[2:])
    return t.reshape(batch, channels, points).transpose(0, 1).reshape(channels, batch * points).to(dtype)


def _from_columns(t: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """The inverse of :func:`_as_columns`: ``(C, B * L) -> shape = (B, C, *grid)``, contiguous, in
    ``dtype``."""
    batch, channels, points = shape[0], shape[1], math.prod(shape[2:])
    if batch == 1:
        return t.view(shape).to(dtype)
    out = t.new_empty(shape, dtype=dtype)
    out.view(batch, channels, points).copy_(t.view(channels, batch, points).transpose(0, 1))
    return out


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _chunks(total: int, max_width: int):
    """``(first_column, width)`` of consecutive runs of at most ``max_width`` columns out of ``total``."""
    for first_column in range(0, total, max_width):
        yield first_column, min(max_width, total - first_column)


def _checked_shape(input: Tensor, weight: Tensor, offset: Optional[Tensor], mask: Optional[Tensor],
                   bias: Optional[Tensor], params: tuple, grad_output: Optional[Tensor]) -> DeformConvShape:
    """Runs the op's C++ argument checks (the CPU kernels' own), then reads the sizes.

    ``params``: ``(stride, padding, dilation, transposed, output_padding, groups)``."""
    torch.ops.dcn_plugin._check_arguments(input, weight, offset, mask, bias, *params, grad_output)
    return DeformConvShape.of(input, weight, offset, mask, *params)


def _grouped_weight(weight: Tensor, g: DeformConvShape) -> Tensor:
    """``(groups, C_grid / groups, C_image / groups * K)``, a view of ``weight``."""
    return weight.view(g.groups, g.grid_channels // g.groups, -1)


def _column_buffer(like: Tensor, rows: int, max_width: int) -> Tensor:
    """Memory for ``rows`` rows of up to ``max_width`` columns (each row rounded up:
    :func:`_columns`), in ``like``'s dtype."""
    return like.new_empty(rows * column_stride(max_width))


def _columns(buffer: Tensor, rows: int, width: int) -> Tensor:
    """A ``(rows, width)`` view of ``buffer`` whose row stride is ``column_stride(width)`` (see
    kernels.py)."""
    stride = column_stride(width)
    return buffer[: rows * stride].view(rows, stride)[:, :width]


def deform_conv(input: Tensor, weight: Tensor, offset: Optional[Tensor], mask: Optional[Tensor],
                bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], transposed: bool, output_padding: Sequence[int], groups: int, *,
                wide_index: Optional[bool] = None) -> Tensor:
    """The forward op (same arguments as ``torch.ops.dcn_plugin.deform_conv``).

    ``wide_index`` forces 64-bit (True) or 32-bit (False) indices in the kernel; by default they
    are 64-bit only where a tensor or index reaches 2^31.

    Returns ``(B, C_out, *out)``.
    """
    params = (stride, padding, dilation, transposed, output_padding, groups)
    g = _checked_shape(input, weight, offset, mask, bias, params, None)
    with device_guard(input):
        run = _transposed_forward if transposed else _forward
        out = run(g, input.contiguous(), _grouped_weight(weight.contiguous(), g), _contiguous(offset),
                  _contiguous(mask), wide_index)
        if bias is not None:
            out += bias.view(1, -1, *[1] * g.n)
    return out


def _forward(g: DeformConvShape, input: Tensor, w: Tensor, offset: Optional[Tensor],
             mask: Optional[Tensor], wide_index: Optional[bool]) -> Tensor:
    """``out = W @ im2col(input)``, a chunk of columns at a time."""
    rows, total = g.image_channels * g.kernel_points, g.batch * g.grid_points
    max_width = min(chunk_width(g, input.dtype, 1, False), max(total, 1))
    buffer = _column_buffer(w, rows, max_width)
    out = w.new_empty(g.grid_channels, total)
    for first, width in _chunks(total, max_width):
        columns = _columns(buffer, rows, width)
        sample(Launch(g, first, width, image=input, offset=offset, mask=mask, columns=columns,
                      wide_index=wide_index))
        out[:, first:first + width] = torch.bmm(w, columns.view(g.groups, -1, width)).view(-1, width)
    return _from_columns(out, g.output_shape, input.dtype)


def _transposed_forward(g: DeformConvShape, input: Tensor, w: Tensor, offset: Optional[Tensor],
                        mask: Optional[Tensor], wide_index: Optional[bool]) -> Tensor:
    """``out = col2im(W^T @ input)``, a chunk of columns at a time."""
    alert_scatter("the output of the transposed op")
    rows, total = g.image_channels * g.kernel_points, g.batch * g.grid_points
    max_width = min(chunk_width(g, input.dtype, 1, False), max(total, 1))
    buffer = _column_buffer(w, rows, max_width)
    dense = _as_columns(input, w.dtype)
    out = w.new_zeros(g.image_shape, dtype=accumulate_dtype(w.dtype))  # the scatter's sums
    for first, width in _chunks(total, max_width):
        grad_columns = _columns(buffer, rows, width).view(g.groups, -1, width)
        chunk = dense[:, first:first + width].view(g.groups, -1, width)
        torch.bmm(w.transpose(1, 2), chunk, out=grad_columns)
        sample(Launch(g, first, width, offset=offset, mask=mask, grad_columns=grad_columns.view(rows, width),
                      grad_image=out, wide_index=wide_index))
    return out.to(input.dtype)


def deform_conv_backward(grad_output: Tensor, input: Tensor, weight: Tensor, offset: Optional[Tensor],
                         mask: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                         groups: int, output_mask: Sequence[bool], *,
                         wide_index: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward op (same arguments as ``torch.ops.dcn_plugin.deform_conv_backward``).

    Returns the gradients of input, weight, offset and mask, each of its tensor's shape where
    ``output_mask`` asks for it (and the tensor is present), else an empty tensor.
    """
    params = (stride, padding, dilation, transposed, output_padding, groups)
    g = _checked_shape(input, weight, offset, mask, None, params, grad_output)
    need = _Needs(output_mask[0], output_mask[1], output_mask[2] and offset is not None,
                  output_mask[3] and mask is not None, transposed)
    if not (need.input or need.weight or need.offset or need.mask):
        return tuple(input.new_empty((0,)) for _ in range(4))
    with device_guard(input):
        backward = _Backward(g, need, grad_output.contiguous(), input.contiguous(), weight.contiguous(),
                             _contiguous(offset), _contiguous(mask), wide_index)
        return backward.run()


class _Needs:
    """Which gradients a backward computes, and so which intermediate results it needs."""

    def __init__(self, input: bool, weight: bool, offset: bool, mask: bool, transposed: bool):
        self.input, self.weight, self.offset, self.mask = input, weight, offset, mask
        self.transposed = transposed
        # d input of convolution is a scatter onto the image; of the transposed op, W @ im2col(grad_out)
        self.scatter = input and not transposed
        self.dense_input = input and transposed
        self.coordinates = offset or mask
        self.columns = weight or self.dense_input
        self.grad_columns = self.coordinates or self.scatter


class _Backward:
    """One call of the backward op: its buffers (in the dtypes the module docstring gives), the work
    on one chunk of columns, the gradients."""

    def __init__(self, g: DeformConvShape, need: _Needs, grad_output: Tensor, input: Tensor, weight: Tensor,
                 offset: Optional[Tensor], mask: Optional[Tensor], wide_index: Optional[bool]):
        if need.scatter:
            alert_scatter("the gradient of the input")
        self.g, self.need, self.wide_index = g, need, wide_index
        self.input, self.weight, self.offset, self.mask = input, weight, offset, mask
        self.image = grad_output if need.transposed else input
        self.w = w = _grouped_weight(weight, g)
        self.dense = _as_columns(input if need.transposed else grad_output, w.dtype)
        self.rows, self.total = g.image_channels * g.kernel_points, g.batch * g.grid_points
        self.max_width = min(chunk_width(g, input.dtype, need.columns + need.grad_columns, need.coordinates),
                             max(self.total, 1))
        self.partial_size = partial_rows(g) * g.kernel_points * (g.n + 1)
        acc = accumulate_dtype(w.dtype)
        self.column_buffer = _column_buffer(w, self.rows, self.max_width) if need.columns else None
        self.grad_column_buffer = _column_buffer(w, self.rows, self.max_width) if need.grad_columns else None
        self.partial_buffer = (w.new_empty(self.partial_size * self.max_width, dtype=acc) if need.coordinates
                               else None)
        self.grad_weight = torch.zeros_like(w, dtype=acc) if need.weight else None
        self.grad_image = w.new_zeros(g.image_shape, dtype=acc) if need.scatter else None
        self.grad_dense = w.new_empty(g.grid_channels, self.total) if need.dense_input else None
        self.grad_offset = w.new_empty(g.offset_channels, self.total, dtype=acc) if need.offset else None
        self.grad_mask = w.new_empty(g.mask_channels, self.total, dtype=acc) if need.mask else None

    def run(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        for first, width in _chunks(self.total, self.max_width):
            self.chunk(first, width)
        return self.gradients()

    def chunk(self, first: int, width: int) -> None:
        """Every gradient's share of the columns ``[first, first + width)``."""
        g, need, w = self.g, self.need, self.w
        dense = self.dense[:, first:first + width].view(g.groups, -1, width)
        grad_columns = columns = partial = None
        if need.grad_columns:
            grad_columns = _columns(self.grad_column_buffer, self.rows, width).view(g.groups, -1, width)
            torch.bmm(w.transpose(1, 2), dense, out=grad_columns)
        if need.columns:
            columns = _columns(self.column_buffer, self.rows, width).view(g.groups, -1, width)
        if need.coordinates:
            partial = self.partial_buffer[: self.partial_size * width]
        sample(Launch(g, first, width, image=self.image if need.columns or need.coordinates else None,
                      offset=self.offset, mask=self.mask,
                      columns=None if columns is None else columns.view(self.rows, width),
                      grad_columns=None if grad_columns is None else grad_columns.view(self.rows, width),
                      grad_image=self.grad_image, partial=partial, offset_grad=need.offset,
                      mask_grad=need.mask, wide_index=self.wide_index))
        if need.weight:
            if self.grad_weight.dtype == w.dtype:
                self.grad_weight.baddbmm_(dense, columns.transpose(1, 2))
            else:  # half types: the chunk's product on tensor cores, the sum over chunks in float32
                self.grad_weight += torch.bmm(dense, columns.transpose(1, 2))
        if need.dense_input:
            self.grad_dense[:, first:first + width] = torch.bmm(w, columns).view(-1, width)
        if need.coordinates:
            _add_up_partial_sums(g, partial, first, width, self.grad_offset, self.grad_mask)

    def gradients(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The gradients in the op's dtype and shapes; empty tensors for those not asked for."""
        need, dtype = self.need, self.input.dtype
        empty = self.input.new_empty((0,))
        if need.input:
            grad_input = self.grad_image.to(dtype) if need.scatter else \
                _from_columns(self.grad_dense, self.input.shape, dtype)
        return (
            grad_input if need.input else empty.clone(),
            self.grad_weight.view(self.weight.shape).to(dtype) if need.weight else empty.clone(),
            _from_columns(self.grad_offset, self.offset.shape, dtype) if need.offset else empty.clone(),
            _from_columns(self.grad_mask, self.mask.shape, dtype) if need.mask else empty.clone(),
        )


def _add_up_partial_sums(g: DeformConvShape, partial: Tensor, first: int, width: int,
                         grad_offset: Optional[Tensor], grad_mask: Optional[Tensor]) -> None:
    """Sums the kernel's partial sums ``(tiles, K, N + 1, width)`` (one per tile of channels) over
    the tiles of each offset group into ``grad_offset[:, first:first + width]``
    ``(offset_groups * K * N, B * L)``, and over those of each mask group into ``grad_mask``
    ``(mask_groups * K, B * L)``, in a fixed order."""
    k, n, groups = g.kernel_points, g.n, g.sample_groups
    per_group = partial.view(groups, -1, k, n + 1, width).sum(1)  # (sample groups, K, N + 1, width)
    if grad_offset is not None:
        og = g.offset_groups
        offsets = per_group[:, :, :n].reshape(og, groups // og, k, n, width).sum(1)
        grad_offset[:, first:first + width] = offsets.view(-1, width)
    if grad_mask is not None:
        mg = g.mask_groups
        masks = per_group[:, :, n].reshape(mg, groups // mg, k, width).sum(1)
        grad_mask[:, first:first + width] = masks.view(-1, width)


__all__: List[str] = ["deform_conv", "deform_conv_backward", "chunk_width", "workspace_limit"]
