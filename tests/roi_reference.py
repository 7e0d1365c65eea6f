"""Slow, obviously-correct pure-PyTorch deformable RoI pooling: the oracle of the RoI pooling tests.

Written from the definitions, one RoI and one bin at a time, not from dcn_plugin's kernels:

- ``deform_roi_pool_reference``: mmcv's ``deform_roi_pool`` (``deform_roi_pool_cuda_kernel.cuh``).
  A RoI ``[b, x1, y1, x2, y2]`` covers ``[x1 * s - 0.5, x2 * s - 0.5]`` (half-pixel alignment, no
  rounding) and is cut into ``out_h x out_w`` bins. Bin ``(i, j)`` is shifted by
  ``gamma * offset[r, :, i, j] * (roi_w, roi_h)`` and averages ``grid_h * grid_w`` samples at the
  centres of a regular grid over the bin (``grid = sampling_ratio``, or ``ceil(bin size)`` when it
  is 0). The divisor is ``max(grid_h * grid_w, 1)``: samples that fall off the map count as zeros.
- ``deform_psroi_pool_reference``: R-FCN's ``DeformablePSROIPooling``
  (``deformable_psroi_pooling.cu``). RoI corners are rounded to whole image pixels (C's ``round``),
  the end pixel included, the RoI at least 0.1 wide; bin ``(i, j)`` of output channel ``c`` reads
  input channel ``(c * G + gi) * G + gj`` at ``sample_per_part ** 2`` points starting at the bin's
  corner, shifted by ``trans_std * offset[r, 2k:2k+2, pi, pj] * (roi_w, roi_h)`` (class ``k`` of
  ``c``, part ``(pi, pj)`` of the bin). Only samples within half a pixel of the map are averaged.
- Both read the map with RoIAlign's bilinear interpolation (:func:`sample_bilinear`): a point
  within ``margin`` pixels of the map (1 for mmcv, 0.5 for R-FCN) is clamped into it and
  interpolated between its four neighbours; a point farther out is invalid.

Every step is a differentiable PyTorch op, so autograd of these functions is the gradient oracle.
The bottom of this file builds the test cases (:class:`RoiCase`) shared by the RoI pooling tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["sample_bilinear", "deform_roi_pool_reference", "deform_psroi_pool_reference", "RoiCase",
           "make_rois", "make_roi_tensors", "run_roi_op", "run_roi_reference", "roi_forward_backward"]


def sample_bilinear(plane: Tensor, ys: Tensor, xs: Tensor, margin: float) -> Tuple[Tensor, Tensor]:
    """RoIAlign's bilinear interpolation of ``plane`` ``(C, H, W)`` at the points ``(ys[n], xs[n])``.

    Returns the values ``(C, N)`` (zero at invalid points) and whether each point is valid ``(N,)``.
    Positions and weights are computed in the dtype of ``ys``; the weighted sum in that of ``plane``.
    """
    height, width = plane.shape[-2:]
    valid = (ys >= -margin) & (ys <= height - 1 + margin) & (xs >= -margin) & (xs <= width - 1 + margin)
    ys = torch.where(valid, ys, torch.zeros_like(ys)).clamp(0, height - 1)
    xs = torch.where(valid, xs, torch.zeros_like(xs)).clamp(0, width - 1)
    y0, x0 = ys.detach().floor().long(), xs.detach().floor().long()
    y1, x1 = (y0 + 1).clamp(max=height - 1), (x0 + 1).clamp(max=width - 1)
    ly, lx = ys - y0, xs - x0
    weights = [((1 - ly) * (1 - lx)).to(plane.dtype), ((1 - ly) * lx).to(plane.dtype),
               (ly * (1 - lx)).to(plane.dtype), (ly * lx).to(plane.dtype)]
    values = (plane[:, y0, x0] * weights[0] + plane[:, y0, x1] * weights[1] + plane[:, y1, x0] * weights[2]
              + plane[:, y1, x1] * weights[3])
    return values * valid.to(plane.dtype), valid


def deform_roi_pool_reference(input: Tensor, rois: Tensor, offset: Optional[Tensor],
                              output_size: Sequence[int], spatial_scale: float = 1.0, sampling_ratio: int = 0,
                              gamma: float = 0.1) -> Tensor:
    """mmcv's deformable RoI pooling: ``(B, C, H, W), (R, 5), (R, 2, out_h, out_w) -> (R, C, out_h, out_w)``.

    Positions are computed in the dtype of ``rois`` (and ``offset``), values in that of ``input``."""
    out_h, out_w = output_size
    pooled = []
    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        x1, y1, x2, y2 = (rois[r, 1:] * spatial_scale - 0.5).unbind()
        roi_w, roi_h = x2 - x1, y2 - y1
        bin_w, bin_h = roi_w / out_w, roi_h / out_h
        grid_h = sampling_ratio if sampling_ratio > 0 else max(math.ceil(float(roi_h / out_h)), 0)
        grid_w = sampling_ratio if sampling_ratio > 0 else max(math.ceil(float(roi_w / out_w)), 0)
        bins = torch.zeros(input.shape[1], out_h, out_w, dtype=input.dtype)
        for i in range(out_h):
            for j in range(out_w):
                start_y, start_x = y1 + i * bin_h, x1 + j * bin_w
                if offset is not None:
                    start_x = start_x + gamma * roi_w * offset[r, 0, i, j]
                    start_y = start_y + gamma * roi_h * offset[r, 1, i, j]
                ys = start_y + (torch.arange(grid_h, dtype=rois.dtype) + 0.5) * bin_h / grid_h
                xs = start_x + (torch.arange(grid_w, dtype=rois.dtype) + 0.5) * bin_w / grid_w
                grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
                values, _ = sample_bilinear(input[b], grid_y.flatten(), grid_x.flatten(), margin=1.0)
                bins = _with_bin(bins, i, j, values.sum(1) / max(grid_h * grid_w, 1))
        pooled.append(bins)
    return torch.stack(pooled) if pooled else input.new_zeros(0, input.shape[1], out_h, out_w)


def _with_bin(bins: Tensor, i: int, j: int, value: Tensor) -> Tensor:
    """``bins`` with ``bins[:, i, j] = value``, out of place (so autograd sees every bin)."""
    mask = torch.zeros(bins.shape[1:], dtype=torch.bool)
    mask[i, j] = True
    return torch.where(mask, value[:, None, None].to(bins.dtype), bins)


def _c_round(t: Tensor) -> Tensor:
    """C's ``round``: halves away from zero (``torch.round`` rounds them to even)."""
    return torch.sign(t) * torch.floor(t.abs() + 0.5)


def deform_psroi_pool_reference(input: Tensor, rois: Tensor, offset: Optional[Tensor], spatial_scale: float,
                                output_dim: int, group_size: int, pooled_size: int, part_size: int,
                                sample_per_part: int, trans_std: float) -> Tensor:
    """R-FCN's deformable position-sensitive RoI pooling:
    ``(B, output_dim * G^2, H, W), (R, 5), (R, 2 * classes, part, part) -> (R, output_dim, P, P)``.

    The part of bin ``i`` is ``i * part_size // pooled_size``; R-FCN computes it as
    ``floor(i / pooled_size * part_size)`` in floating point, which is the same for every pooled size
    up to 21 (larger ones can differ by one from rounding)."""
    size, groups = pooled_size, group_size
    classes = 1 if offset is None else offset.shape[1] // 2
    per_class = output_dim // classes
    pooled = []
    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        corners = _c_round(rois[r, 1:])
        x1, y1 = corners[0] * spatial_scale - 0.5, corners[1] * spatial_scale - 0.5
        x2, y2 = (corners[2] + 1) * spatial_scale - 0.5, (corners[3] + 1) * spatial_scale - 0.5
        roi_w, roi_h = (x2 - x1).clamp_min(0.1), (y2 - y1).clamp_min(0.1)
        bin_w, bin_h = roi_w / size, roi_h / size
        steps = torch.arange(sample_per_part, dtype=rois.dtype)
        bins = torch.zeros(output_dim, size, size, dtype=input.dtype)
        for i in range(size):
            for j in range(size):
                gi, gj = min(i * groups // size, groups - 1), min(j * groups // size, groups - 1)
                pi, pj = i * part_size // size, j * part_size // size
                value = []
                for k in range(classes):
                    start_y, start_x = y1 + i * bin_h, x1 + j * bin_w
                    if offset is not None:
                        start_x = start_x + trans_std * offset[r, 2 * k, pi, pj] * roi_w
                        start_y = start_y + trans_std * offset[r, 2 * k + 1, pi, pj] * roi_h
                    grid_y, grid_x = torch.meshgrid(start_y + steps * bin_h / sample_per_part,
                                                    start_x + steps * bin_w / sample_per_part, indexing="ij")
                    outputs = range(k * per_class, (k + 1) * per_class)
                    channels = [(c * groups + gi) * groups + gj for c in outputs]
                    values, valid = sample_bilinear(input[b, channels], grid_y.flatten(), grid_x.flatten(),
                                                    margin=0.5)
                    count = int(valid.sum())
                    value.append(values.sum(1) / count if count else values.sum(1) * 0)
                bins = _with_bin(bins, i, j, torch.cat(value))
        pooled.append(bins)
    return torch.stack(pooled) if pooled else input.new_zeros(0, output_dim, size, size)


# ------------------------------------------------------------------------------------------------
# Test cases shared by the RoI pooling tests.


@dataclasses.dataclass(frozen=True)
class RoiCase:
    """One configuration of either op: ``kind`` is ``"roi"`` (mmcv's ``deform_roi_pool``) or
    ``"psroi"`` (R-FCN's ``deform_psroi_pool``). ``channels`` are output channels (the PS op's input
    has ``channels * group_size ** 2``)."""

    kind: str = "roi"
    batch: int = 2
    channels: int = 3
    size: Tuple[int, int] = (7, 9)
    spatial_scale: float = 0.5
    offset: bool = True
    # mmcv
    output_size: Tuple[int, int] = (3, 2)
    sampling_ratio: int = 2
    gamma: float = 0.2
    # R-FCN
    group_size: int = 2
    pooled_size: int = 3
    part_size: int = 2
    sample_per_part: int = 2
    trans_std: float = 0.3
    classes: int = 1

    def replace(self, **changes) -> RoiCase:
        return dataclasses.replace(self, **changes)

    @property
    def in_channels(self) -> int:
        return self.channels * (self.group_size ** 2 if self.kind == "psroi" else 1)

    @property
    def pooled(self) -> Tuple[int, int]:
        return self.output_size if self.kind == "roi" else (self.pooled_size, self.pooled_size)

    def offset_shape(self, rois: int) -> Tuple[int, ...]:
        if self.kind == "roi":
            return (rois, 2, *self.output_size)
        return (rois, 2 * self.classes, self.part_size, self.part_size)

    def params(self) -> tuple:
        """The op's arguments after ``(input, rois, offset)``."""
        if self.kind == "roi":
            return (list(self.output_size), self.spatial_scale, self.sampling_ratio, self.gamma)
        return (self.spatial_scale, self.channels, self.group_size, self.pooled_size, self.part_size,
                self.sample_per_part, self.trans_std)

    @property
    def op(self):
        name = "deform_roi_pool" if self.kind == "roi" else "deform_psroi_pool"
        return getattr(torch.ops.dcn_plugin, name)

    @property
    def backward_op(self):
        name = "deform_roi_pool_backward" if self.kind == "roi" else "deform_psroi_pool_backward"
        return getattr(torch.ops.dcn_plugin, name)


def make_rois(case: RoiCase, count: int, generator: torch.Generator) -> Tensor:
    """``(count, 5)`` RoIs in image coordinates (the map is ``size / spatial_scale`` pixels): the first
    ones inside the map, partly outside, wholly outside, of zero width, of zero height, inverted
    and larger than the map; then random ones (partly outside a fifth of the time)."""
    height, width = (s / case.spatial_scale for s in case.size)
    fixed = [[0.2 * width, 0.3 * height, 0.7 * width, 0.8 * height],
             [-0.4 * width, 0.5 * height, 0.3 * width, 1.3 * height],
             [1.2 * width, -0.9 * height, 1.6 * width, -0.2 * height],
             [0.4 * width, 0.1 * height, 0.4 * width, 0.6 * height],
             [0.1 * width, 0.45 * height, 0.9 * width, 0.45 * height],
             [0.8 * width, 0.7 * height, 0.3 * width, 0.2 * height],
             [-0.3 * width, -0.2 * height, 1.4 * width, 1.25 * height]]
    rows = [torch.tensor(corners, dtype=torch.float64) for corners in fixed[:count]]
    for _ in range(count - len(rows)):
        corner = torch.rand(2, generator=generator, dtype=torch.float64) * 1.2 - 0.1
        extent = torch.rand(2, generator=generator, dtype=torch.float64) * 0.7 + 0.05
        low = corner * torch.tensor([width, height], dtype=torch.float64)
        rows.append(torch.cat([low, low + extent * torch.tensor([width, height], dtype=torch.float64)]))
    batch = torch.randint(0, case.batch, (count, 1), generator=generator).double()
    return torch.cat([batch, torch.stack(rows)], 1) if rows else torch.zeros(0, 5, dtype=torch.float64)


def make_roi_tensors(case: RoiCase, rois: int = 9, dtype: torch.dtype = torch.float64, device="cpu",
                     seed: int = 0) -> Dict[str, Optional[Tensor]]:
    """``input``, ``rois`` and ``offset`` (None without one), drawn in float64 from ``seed``; input and
    offset converted to ``dtype``, rois kept in float64 (any floating dtype is accepted)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "input": torch.randn(case.batch, case.in_channels, *case.size, generator=g, dtype=torch.float64),
        "rois": make_rois(case, rois, g),
        "offset": torch.rand(case.offset_shape(rois), generator=g, dtype=torch.float64) * 2 - 1
        if case.offset else None,
    }
    return {k: None if t is None else t.to(device, dtype if k != "rois" else torch.float64)
            for k, t in tensors.items()}


def run_roi_op(case: RoiCase, tensors: Dict[str, Optional[Tensor]]) -> Tensor:
    """The op through the public functional API."""
    from dcn_plugin import ops

    input, rois, offset = tensors["input"], tensors["rois"], tensors["offset"]
    if case.kind == "roi":
        return ops.deform_roi_pool(input, rois, offset, case.output_size, case.spatial_scale,
                                   case.sampling_ratio, case.gamma)
    return ops.deform_psroi_pool(input, rois, offset, case.spatial_scale, case.channels, case.group_size,
                                 case.pooled_size, case.part_size, case.sample_per_part, case.trans_std)


def run_roi_reference(case: RoiCase, tensors: Dict[str, Optional[Tensor]]) -> Tensor:
    """The reference on CPU copies of ``tensors`` (in their dtypes: pass float64 for an oracle)."""
    input, rois, offset = (None if t is None else t.cpu() for t in (tensors["input"], tensors["rois"],
                                                                      tensors["offset"]))
    if case.kind == "roi":
        return deform_roi_pool_reference(input, rois, offset, case.output_size, case.spatial_scale,
                                         case.sampling_ratio, case.gamma)
    return deform_psroi_pool_reference(input, rois, offset, *case.params())


def roi_forward_backward(run, case: RoiCase, tensors: Dict[str, Optional[Tensor]],
                         seed: int = 1) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``run(case, leaves)`` with input and offset requiring grad, then backward of a random
    ``grad_output`` (drawn in float64 from ``seed``): the output and the input and offset gradients."""
    leaves = {k: None if t is None else t.detach().clone().requires_grad_(k != "rois")
              for k, t in tensors.items()}
    out = run(case, leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(grad.to(out.device, out.dtype))
    return out.detach(), {k: t.grad for k, t in leaves.items() if t is not None and k != "rois"}


# Cases of both ops the tests share: inside the map, adaptive sampling, no offset, per-class offsets,
# parts finer and coarser than bins, channel blocks.
ROI = RoiCase("roi")
PSROI = RoiCase("psroi")
ROI_CASES = {
    "roi": ROI,
    "roi-adaptive": ROI.replace(sampling_ratio=0, size=(9, 11), spatial_scale=0.75),
    "roi-no-offset": ROI.replace(offset=False, output_size=(2, 3), sampling_ratio=3),
    "roi-square-7x7": ROI.replace(output_size=(7, 7), channels=2, sampling_ratio=1, gamma=0.1),
    "psroi": PSROI,
    "psroi-classes": PSROI.replace(channels=4, classes=2, group_size=3, pooled_size=3, part_size=3),
    "psroi-no-offset": PSROI.replace(offset=False, sample_per_part=3),
    "psroi-parts-finer": PSROI.replace(pooled_size=2, part_size=3, group_size=1, sample_per_part=1),
    "psroi-per-class": PSROI.replace(channels=3, classes=3, group_size=2, pooled_size=4, part_size=2),
    # One offset part across all four position-sensitive groups; many channels over one image, split
    # into blocks: the CPU backward computes the offset gradient in a pass of its own for both.
    "psroi-part-across-groups": PSROI.replace(group_size=2, pooled_size=4, part_size=1),
    "roi-channel-blocks": ROI.replace(batch=1, channels=40),
}
