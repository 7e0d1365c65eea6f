"""Triton kernel of the deformable RoI pooling ops: ``dcn_plugin::deform_roi_pool`` (mmcv's
``DeformRoIPool``), ``dcn_plugin::deform_psroi_pool`` (R-FCN's deformable PSRoIPool) and their
backward ops.

Both ops are RoIAlign with offsets and differ in a few settings (``csrc/roi_pool.h``), which
:class:`RoiPoolSpec` holds. The op's C++ argument checks run first and return the RoI table that the
CPU kernels use too: one row per RoI with its batch index, corner, size and samples per bin
(``torch.ops.dcn_plugin._deform_roi_pool_table`` / ``_deform_psroi_pool_table``). One kernel,
:func:`roi_pool_kernel`, does the forward and the backward pass, picked by constexpr flags.

A program pools one bin of one RoI for ``BLOCK_CHANNELS`` channels that share one offset (R-FCN may
give each class its own offsets), so the bin's sampling positions are scalars, computed once, and
each corner of a sample is one vector load of those channels from the input, read channels-last per
position-sensitive group, ``(B, H, W, G * G, C)``. Positions and sums are in ``ACC``
(:func:`~dcn_plugin.ops.shapes.accumulate_dtype`: float32, float64 for double).

- Forward: the average of the bin's samples, stored into the output ``(R, C, PH, PW)``.
- Input gradient: scattered with ``tl.atomic_add`` (RoIs overlap) into a ``(B, H, W, G * G, C)``
  buffer in ``ACC``; under ``torch.use_deterministic_algorithms(True)`` this raises an error, as the
  convolution's scatter does.
- Offset gradient: each program writes its partial sum, which the driver adds up in a fixed order:
  deterministic.

These functions take the ops' arguments and work on CUDA tensors, or on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests check the kernel without a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..shapes import accumulate_dtype
from .driver import alert_scatter, device_guard
from .kernels import FP_FUSION, TRITON_DTYPES

#: The RoI table's columns that :func:`roi_pool_kernel` reads.
_KERNEL_READS = ("batch", "y0", "x0", "height", "width", "grid_h", "grid_w")


def _table_columns() -> Dict[str, int]:
    """The column of each name in the RoI table, from its one definition, in C++ (``RoiColumn`` in
    ``csrc/roi_pool.h``, through ``dcn_plugin::_roi_table_columns``)."""
    columns = {name: index for index, name in enumerate(torch.ops.dcn_plugin._roi_table_columns())}
    missing = [name for name in _KERNEL_READS if name not in columns]
    if missing:
        raise RuntimeError(f"roi_pool_kernel reads RoI table columns {missing} that the compiled ops do not "
                           f"define (they define {list(columns)}): rebuild them from this tree")
    return columns


#: Column index of each name in the RoI table, read once at import.
TABLE_COLUMNS = _table_columns()
# The table's row length and the kernel's columns, as compile-time constants of the kernel.
_ROW_LENGTH = tl.constexpr(len(TABLE_COLUMNS))
_BATCH = tl.constexpr(TABLE_COLUMNS["batch"])
_Y0 = tl.constexpr(TABLE_COLUMNS["y0"])
_X0 = tl.constexpr(TABLE_COLUMNS["x0"])
_HEIGHT = tl.constexpr(TABLE_COLUMNS["height"])
_WIDTH = tl.constexpr(TABLE_COLUMNS["width"])
_GRID_H = tl.constexpr(TABLE_COLUMNS["grid_h"])
_GRID_W = tl.constexpr(TABLE_COLUMNS["grid_w"])


@triton.jit
def _clamp_axis(pos, size, MARGIN: tl.constexpr):
    """RoIAlign's clamped interpolation along one axis (``clamp_axis`` in ``csrc/roi_pool.h``):
    whether ``pos`` is within ``MARGIN`` of ``[0, size - 1]``, the two neighbours of the clamped
    position (always inside the map), their weights (0 when not valid), and d frac / d pos (1 inside,
    0 where clamped)."""
    last = size - 1.0
    valid = (pos >= -MARGIN) & (pos <= last + MARGIN)
    inside = (pos > 0) & (pos < last)
    clamped = tl.where(inside, pos, tl.where(pos > 0, last, 0.0))
    low = tl.floor(clamped)
    frac = clamped - low
    low_index = low.to(tl.int64)
    high_index = tl.where(inside, low_index + 1, low_index)
    return (valid, low_index, high_index, tl.where(valid, 1.0 - frac, 0.0), tl.where(valid, frac, 0.0),
            tl.where(inside, 1.0, 0.0))


_INTEGER_ARGUMENTS = ["items", "channels", "per_class", "tiles_per_class", "height", "width", "groups",
                      "group_size", "pooled_h", "pooled_w", "part_h", "part_w", "classes"]


@triton.jit(do_not_specialize=_INTEGER_ARGUMENTS)
def roi_pool_kernel(
    input, table, offset, grad_output, output, grad_input, partial,
    items, channels, per_class, tiles_per_class, height, width, groups, group_size,
    pooled_h, pooled_w, part_h, part_w, classes, scale,
    ALIGN: tl.constexpr, MARGIN: tl.constexpr, COUNT_VALID: tl.constexpr, HAS_OFFSET: tl.constexpr,
    FORWARD: tl.constexpr, INPUT_GRAD: tl.constexpr, OFFSET_GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """See the module docstring. Shapes: input ``(B, H, W, groups, C)``, table ``(R, columns)`` in
    ``ACC`` (columns as :data:`TABLE_COLUMNS`), scale ``(1,)`` in ``ACC`` (the offsets' scale),
    offset ``(R, classes, 2, part_h, part_w)``, grad_output and output ``(R, C, PH, PW)``,
    grad_input ``(B, H, W, groups, C)`` in ``ACC``, partial ``(classes * tiles, items = R * PH * PW, 2)``
    in ``ACC``."""
    # Programs along axis 0 run over the items (RoI, bin); along axis 1 over the offset classes, then
    # the tiles of channels within a class.
    item = tl.program_id(0).to(tl.int64)
    class_tile = tl.program_id(1)
    bins = pooled_h * pooled_w
    roi = item // bins
    bin_index = item % bins
    ph = bin_index // pooled_w
    pw = bin_index % pooled_w
    cls = class_tile // tiles_per_class
    in_class = (class_tile % tiles_per_class) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_ok = in_class < per_class
    channel = (cls * per_class + in_class).to(tl.int64)
    group = tl.minimum(ph * group_size // pooled_h, group_size - 1) * group_size + \
        tl.minimum(pw * group_size // pooled_w, group_size - 1)
    part = (ph * part_h // pooled_h) * part_w + pw * part_w // pooled_w

    table_row = table + roi * _ROW_LENGTH
    batch = tl.load(table_row + _BATCH).to(tl.int64)
    roi_h = tl.load(table_row + _HEIGHT)
    roi_w = tl.load(table_row + _WIDTH)
    grid_h = tl.load(table_row + _GRID_H).to(tl.int32)
    grid_w = tl.load(table_row + _GRID_W).to(tl.int32)
    bin_h = roi_h / pooled_h
    bin_w = roi_w / pooled_w
    y0 = tl.load(table_row + _Y0) + ph * bin_h
    x0 = tl.load(table_row + _X0) + pw * bin_w
    offset_scale = tl.load(scale)
    dx_doffset = offset_scale * roi_w
    dy_doffset = offset_scale * roi_h
    if HAS_OFFSET:
        # the x offset of (RoI, class, part); its y offset is part_h * part_w further on
        part_offset = offset + (roi * classes + cls) * 2 * part_h * part_w + part
        x0 += tl.load(part_offset).to(ACC) * dx_doffset
        y0 += tl.load(part_offset + part_h * part_w).to(ACC) * dy_doffset
    step_y = bin_h / tl.maximum(grid_h, 1)
    step_x = bin_w / tl.maximum(grid_w, 1)

    if COUNT_VALID:  # R-FCN: the average of the valid samples (validity is per axis)
        valid_y = tl.full((), 0, tl.int32)
        for iy in range(0, grid_h):
            valid_y += _clamp_axis(y0 + (iy + ALIGN) * step_y, height, MARGIN)[0].to(tl.int32)
        valid_x = tl.full((), 0, tl.int32)
        for ix in range(0, grid_w):
            valid_x += _clamp_axis(x0 + (ix + ALIGN) * step_x, width, MARGIN)[0].to(tl.int32)
        count = valid_y * valid_x
    else:  # mmcv: samples off the map count as zeros
        count = tl.maximum(grid_h * grid_w, 1)
    inverse_count = tl.where(count > 0, 1.0 / tl.maximum(count, 1).to(ACC), 0.0)

    pixel_stride = groups * channels
    plane = (batch * height * width * groups + group) * channels + channel  # at pixel (0, 0)
    if INPUT_GRAD or OFFSET_GRAD:
        grad = tl.load(grad_output + (roi * channels + channel) * bins + bin_index, mask=channel_ok,
                       other=0.0).to(ACC)
    value = tl.zeros((BLOCK_CHANNELS,), ACC)
    sum_x = tl.zeros((BLOCK_CHANNELS,), ACC)  # per channel: d (the sum of the samples) / d x
    sum_y = tl.zeros((BLOCK_CHANNELS,), ACC)
    for iy in range(0, grid_h):
        y = y0 + (iy + ALIGN) * step_y
        _, y_low, y_high, wy_low, wy_high, y_slope = _clamp_axis(y, height, MARGIN)
        for ix in range(0, grid_w):
            x = x0 + (ix + ALIGN) * step_x
            _, x_low, x_high, wx_low, wx_high, x_slope = _clamp_axis(x, width, MARGIN)
            # The sample's four corners. An invalid sample has weight 0 and reads inside the map: no
            # per-sample mask (Triton's interpreter cannot combine a scalar mask with a vector one).
            ll = plane + (y_low * width + x_low) * pixel_stride
            lh = plane + (y_low * width + x_high) * pixel_stride
            hl = plane + (y_high * width + x_low) * pixel_stride
            hh = plane + (y_high * width + x_high) * pixel_stride
            if FORWARD or OFFSET_GRAD:
                v_ll = tl.load(input + ll, mask=channel_ok, other=0.0).to(ACC)
                v_lh = tl.load(input + lh, mask=channel_ok, other=0.0).to(ACC)
                v_hl = tl.load(input + hl, mask=channel_ok, other=0.0).to(ACC)
                v_hh = tl.load(input + hh, mask=channel_ok, other=0.0).to(ACC)
                if FORWARD:
                    value += wy_low * (wx_low * v_ll + wx_high * v_lh)
                    value += wy_high * (wx_low * v_hl + wx_high * v_hh)
                if OFFSET_GRAD:
                    sum_x += x_slope * (wy_low * (v_lh - v_ll) + wy_high * (v_hh - v_hl))
                    sum_y += y_slope * (wx_low * (v_hl - v_ll) + wx_high * (v_hh - v_lh))
            if INPUT_GRAD:
                sample_grad = grad * inverse_count
                # relaxed: a pure scatter (see kernels.py)
                tl.atomic_add(grad_input + ll, sample_grad * (wy_low * wx_low), mask=channel_ok,
                              sem="relaxed")
                tl.atomic_add(grad_input + lh, sample_grad * (wy_low * wx_high), mask=channel_ok,
                              sem="relaxed")
                tl.atomic_add(grad_input + hl, sample_grad * (wy_high * wx_low), mask=channel_ok,
                              sem="relaxed")
                tl.atomic_add(grad_input + hh, sample_grad * (wy_high * wx_high), mask=channel_ok,
                              sem="relaxed")
    if FORWARD:
        tl.store(output + (roi * channels + channel) * bins + bin_index,
                 (value * inverse_count).to(output.dtype.element_ty), mask=channel_ok)
    if OFFSET_GRAD:
        slot = partial + (class_tile * items + item) * 2
        tl.store(slot, tl.sum(grad * sum_x, axis=0) * inverse_count * dx_doffset)
        tl.store(slot + 1, tl.sum(grad * sum_y, axis=0) * inverse_count * dy_doffset)


@dataclasses.dataclass(frozen=True)
class RoiPoolSpec:
    """The rule of one call (``RoiPoolSpec`` in ``csrc/roi_pool.h``): sample alignment in the bin,
    validity margin, divisor, position-sensitive groups, offset parts and classes."""

    op: str
    align: float
    margin: float
    count_valid: bool
    pooled: Tuple[int, int]
    group_size: int
    parts: Tuple[int, int]
    classes: int
    channels: int  # C, output channels
    offset_scale: float

    @property
    def bins(self) -> int:
        return self.pooled[0] * self.pooled[1]

    def part_matrix(self, device, dtype) -> Optional[Tensor]:
        """``(bins, parts)`` one-hot: the part of each bin; None where every bin is its own part."""
        if self.parts == self.pooled:
            return None
        (pooled_h, pooled_w), (part_h, part_w) = self.pooled, self.parts
        # built on the device (no copy from the host), with the kernel's rule for the part of bin (ph, pw)
        part_rows = torch.arange(pooled_h, device=device) * part_h // pooled_h
        part_cols = torch.arange(pooled_w, device=device) * part_w // pooled_w
        index = (part_rows[:, None] * part_w + part_cols[None, :]).reshape(-1)
        return (index[:, None] == torch.arange(part_h * part_w, device=device)[None, :]).to(dtype)


def _mmcv_spec(input: Tensor, output_size: Sequence[int], gamma: float) -> RoiPoolSpec:
    size = (int(output_size[0]), int(output_size[1]))
    return RoiPoolSpec("dcn_plugin::deform_roi_pool", align=0.5, margin=1.0, count_valid=False, pooled=size,
                       group_size=1, parts=size, classes=1, channels=input.shape[1], offset_scale=gamma)


def _rfcn_spec(offset: Optional[Tensor], output_dim: int, group_size: int, pooled_size: int, part_size: int,
               trans_std: float) -> RoiPoolSpec:
    classes = 1 if offset is None else offset.shape[1] // 2
    return RoiPoolSpec("dcn_plugin::deform_psroi_pool", align=0.0, margin=0.5, count_valid=True,
                       pooled=(pooled_size, pooled_size), group_size=group_size, parts=(part_size, part_size),
                       classes=classes, channels=output_dim, offset_scale=trans_std)


def _channels_last(spec: RoiPoolSpec, input: Tensor) -> Tensor:
    """``(B, C * G * G, H, W) -> (B, H, W, G * G, C)``: input channel ``c * G * G + g`` to ``[..., g, c]``."""
    batch, _, height, width = input.shape
    groups = spec.group_size ** 2
    return input.reshape(batch, spec.channels, groups, height, width).permute(0, 3, 4, 2, 1).contiguous()


def _block_channels(spec: RoiPoolSpec) -> int:
    return min(64, triton.next_power_of_2(max(spec.channels // spec.classes, 1)))


def roi_pool_warps(channels_per_program: int) -> int:
    """Warps per program of :func:`roi_pool_kernel`: its tile is one vector of ``channels_per_program``
    channels, one per thread, so one warp up to 32 channels and two for 64 (Triton's default of 4
    would leave half the threads or more idle)."""
    return max(1, min(4, channels_per_program // 32))


def _launch(spec: RoiPoolSpec, input_cl: Tensor, table: Tensor, offset: Optional[Tensor], *,
            grad_output: Optional[Tensor] = None, output: Optional[Tensor] = None,
            grad_input: Optional[Tensor] = None, partial: Optional[Tensor] = None) -> None:
    """Runs :func:`roi_pool_kernel` over every bin of every RoI: the forward pass into ``output``, the
    input gradient into ``grad_input`` and the offset gradient's partial sums into ``partial``."""
    roi_count, per_class = table.shape[0], spec.channels // spec.classes
    if roi_count == 0 or per_class == 0:
        return
    if not input_cl.is_cuda and isinstance(roi_pool_kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("dcn_plugin's Triton kernels run on CPU tensors only under Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before triton is first imported")
    acc = accumulate_dtype(input_cl.dtype)  # the table's dtype: C++ builds it with the same rule
    block = _block_channels(spec)
    tiles = triton.cdiv(per_class, block)
    _, height, width, groups, _ = input_cl.shape

    def pointer(t):
        return input_cl if t is None else t

    roi_pool_kernel[(roi_count * spec.bins, spec.classes * tiles)](
        input_cl, table, pointer(offset), pointer(grad_output), pointer(output), pointer(grad_input),
        pointer(partial), roi_count * spec.bins, spec.channels, per_class, tiles, height, width, groups,
        spec.group_size, *spec.pooled, *spec.parts, spec.classes,
        torch.full((1,), spec.offset_scale, dtype=acc, device=table.device),
        ALIGN=spec.align, MARGIN=spec.margin, COUNT_VALID=spec.count_valid, HAS_OFFSET=offset is not None,
        FORWARD=output is not None, INPUT_GRAD=grad_input is not None, OFFSET_GRAD=partial is not None,
        ACC=TRITON_DTYPES[acc], BLOCK_CHANNELS=block, num_warps=roi_pool_warps(block),
        enable_fp_fusion=FP_FUSION,
    )


def _forward(spec: RoiPoolSpec, input: Tensor, table: Tensor, offset: Optional[Tensor]) -> Tensor:
    output = input.new_empty(table.shape[0], spec.channels, *spec.pooled)
    with device_guard(input):
        _launch(spec, _channels_last(spec, input), table, None if offset is None else offset.contiguous(),
                output=output)
    return output


def _backward(spec: RoiPoolSpec, grad_output: Tensor, input: Tensor, table: Tensor, offset: Optional[Tensor],
              output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    need_input, need_offset = output_mask[0], output_mask[1] and offset is not None
    grad_input, grad_offset = input.new_empty((0,)), input.new_empty((0,))
    if not (need_input or need_offset):
        return grad_input, grad_offset
    if need_input:
        alert_scatter("the gradient of the input", op=f"{spec.op}_backward", deterministic="offset gradients")
    roi_count, acc = table.shape[0], accumulate_dtype(input.dtype)
    batch, _, height, width = input.shape
    groups = spec.group_size ** 2
    input_cl = _channels_last(spec, input)
    tiles = triton.cdiv(spec.channels // spec.classes, _block_channels(spec)) if spec.channels else 0
    scatter = input.new_zeros(batch, height, width, groups, spec.channels, dtype=acc) if need_input else None
    partial = (input.new_zeros(spec.classes * tiles, roi_count * spec.bins, 2, dtype=acc) if need_offset
               else None)
    with device_guard(input):
        _launch(spec, input_cl, table, None if offset is None else offset.contiguous(),
                grad_output=grad_output.contiguous(), grad_input=scatter, partial=partial)
    if need_input:
        grad_input = scatter.permute(0, 4, 3, 1, 2).reshape(input.shape).to(input.dtype)
    if need_offset:
        grad_offset = _offset_gradient(spec, partial, tiles, roi_count).to(offset.dtype)
    return grad_input, grad_offset


def _offset_gradient(spec: RoiPoolSpec, partial: Tensor, tiles: int, roi_count: int) -> Tensor:
    """Adds the kernel's partial sums ``(classes * tiles, R * bins, 2)`` up over the tiles of each
    class and the bins of each part, into ``(R, 2 * classes, *parts)``, in a fixed order."""
    per_bin = partial.view(spec.classes, tiles, roi_count, spec.bins, 2).sum(1)  # (classes, R, bins, 2)
    matrix = spec.part_matrix(partial.device, partial.dtype)
    per_part = per_bin if matrix is None else torch.einsum("krbd,bp->krpd", per_bin, matrix)
    return per_part.permute(1, 0, 3, 2).reshape(roi_count, 2 * spec.classes, *spec.parts).contiguous()


def deform_roi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor], output_size: Sequence[int],
                    spatial_scale: float, sampling_ratio: int, gamma: float) -> Tensor:
    """``dcn_plugin::deform_roi_pool`` (same arguments); returns ``(R, C, *output_size)``."""
    table = torch.ops.dcn_plugin._deform_roi_pool_table(input, rois, offset, output_size, spatial_scale,
                                                        sampling_ratio, gamma, None)
    return _forward(_mmcv_spec(input, output_size, gamma), input, table, offset)


def deform_roi_pool_backward(grad_output: Tensor, input: Tensor, rois: Tensor, offset: Optional[Tensor],
                             output_size: Sequence[int], spatial_scale: float, sampling_ratio: int,
                             gamma: float, output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """``dcn_plugin::deform_roi_pool_backward``: the input and offset gradients asked for (else empty)."""
    table = torch.ops.dcn_plugin._deform_roi_pool_table(input, rois, offset, output_size, spatial_scale,
                                                        sampling_ratio, gamma, grad_output)
    return _backward(_mmcv_spec(input, output_size, gamma), grad_output, input, table, offset, output_mask)


def deform_psroi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor], spatial_scale: float,
                      output_dim: int, group_size: int, pooled_size: int, part_size: int,
                      sample_per_part: int, trans_std: float) -> Tensor:
    """``dcn_plugin::deform_psroi_pool`` (same arguments); returns ``(R, output_dim, P, P)``."""
    table = torch.ops.dcn_plugin._deform_psroi_pool_table(input, rois, offset, spatial_scale, output_dim,
                                                          group_size, pooled_size, part_size, sample_per_part,
                                                          trans_std, None)
    spec = _rfcn_spec(offset, output_dim, group_size, pooled_size, part_size, trans_std)
    return _forward(spec, input, table, offset)


def deform_psroi_pool_backward(grad_output: Tensor, input: Tensor, rois: Tensor, offset: Optional[Tensor],
                               spatial_scale: float, output_dim: int, group_size: int, pooled_size: int,
                               part_size: int, sample_per_part: int, trans_std: float,
                               output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """``dcn_plugin::deform_psroi_pool_backward``: the input and offset gradients asked for (else empty)."""
    table = torch.ops.dcn_plugin._deform_psroi_pool_table(input, rois, offset, spatial_scale, output_dim,
                                                          group_size, pooled_size, part_size, sample_per_part,
                                                          trans_std, grad_output)
    spec = _rfcn_spec(offset, output_dim, group_size, pooled_size, part_size, trans_std)
    return _backward(spec, grad_output, input, table, offset, output_mask)


__all__ = ["deform_roi_pool", "deform_roi_pool_backward", "deform_psroi_pool", "deform_psroi_pool_backward",
           "RoiPoolSpec", "TABLE_COLUMNS", "roi_pool_warps"]
