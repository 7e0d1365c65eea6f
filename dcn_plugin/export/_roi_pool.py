"""Deformable RoI pooling (``dcn_plugin::deform_roi_pool``, ``deform_psroi_pool``) as standard ONNX ops.

- ``deform_roi_pool`` without offsets is RoIAlign with half-pixel coordinates: ONNX's ``RoiAlign``
  (opset 16's ``coordinate_transformation_mode="half_pixel"``), which takes adaptive sampling too.
- With offsets, and ``deform_psroi_pool`` always, the computation of ``csrc/roi_pool.h`` from
  standard ops, for a fixed number of samples per bin: per RoI, class, bin and sample, the sampling
  position (the RoI table, the bin, the offset of the bin's part, the sample), RoIAlign's clamped
  bilinear interpolation of its four corners by ``Gather`` from the input laid out
  ``(B * H * W * G * G * classes, channels per class)``, and the average over the bin. Positions
  and sums are in float32 (float64 for double inputs), as in the op.

Adaptive sampling (``sampling_ratio=0``) with offsets has no fixed number of samples, so it cannot be
exported; it raises :class:`~dcn_plugin.export.DeformConvExportError` naming the argument.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnxscript import ir

from ._graph import ints

__all__ = ["RoiPoolExport", "deform_roi_pool", "deform_psroi_pool"]

_COMPUTE = {ir.DataType.DOUBLE: ir.DataType.DOUBLE}  # everything else computes in float32


@dataclasses.dataclass(frozen=True)
class RoiPoolExport:
    """One call's static parameters (``csrc/roi_pool.h``'s ``RoiPoolSpec``)."""

    rfcn: bool  # R-FCN's rule (rounded corners, samples from the bin's start, average of valid ones)
    pooled: tuple[int, int]
    group_size: int
    parts: tuple[int, int]
    classes: int
    channels: int  # output channels
    spatial_scale: float
    sampling: int
    offset_scale: float

    @property
    def align(self) -> float:
        return 0.0 if self.rfcn else 0.5

    @property
    def margin(self) -> float:
        return 0.5 if self.rfcn else 1.0


def deform_roi_pool(op, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, error):
    """``(R, C, *output_size)``; ``error(problem)`` builds the exception for what cannot be exported."""
    if offset is None:
        boxes = op.CastLike(op.Slice(rois, ints(op, 1), ints(op, 5), ints(op, 1)), input)
        out = op.RoiAlign(input, boxes, op.Cast(op.Gather(rois, op.Constant(value_int=0), axis=1),
                                                to=ir.DataType.INT64),
                          coordinate_transformation_mode="half_pixel", mode="avg",
                          output_height=output_size[0], output_width=output_size[1],
                          sampling_ratio=sampling_ratio, spatial_scale=spatial_scale)
        if sampling_ratio == 0:
            # Adaptive sampling takes no samples from a RoI without area (or with NaN corners): the op
            # gives 0 there, OpenVINO's ROIAlign 0 / 0.
            size = op.Sub(op.Slice(boxes, ints(op, 2), ints(op, 4), ints(op, 1)),
                          op.Slice(boxes, ints(op, 0), ints(op, 2), ints(op, 1)))
            empty = op.Not(op.Greater(op.ReduceMin(size, ints(op, 1), keepdims=0), op.CastLike(0.0, input)))
            out = op.Where(op.Reshape(empty, ints(op, -1, 1, 1, 1)), op.CastLike(0.0, input), out)
        return out
    if sampling_ratio == 0:
        raise error("deform_roi_pool with offsets and sampling_ratio=0 (adaptive: a number of samples that "
                    "depends on each RoI's size) cannot be exported; set sampling_ratio > 0")
    spec = RoiPoolExport(False, tuple(output_size), 1, tuple(output_size), 1, input.shape[1], spatial_scale,
                         sampling_ratio, gamma)
    return _pool(op, spec, input, rois, offset)


def deform_psroi_pool(op, input, rois, offset, spatial_scale, output_dim, group_size, pooled_size, part_size,
                      sample_per_part, trans_std):
    """``(R, output_dim, pooled_size, pooled_size)``."""
    classes = 1 if offset is None else offset.shape[1] // 2
    spec = RoiPoolExport(True, (pooled_size, pooled_size), group_size, (part_size, part_size), classes,
                         output_dim, spatial_scale, sample_per_part, trans_std)
    return _pool(op, spec, input, rois, offset)


def _pool(op, spec: RoiPoolExport, input, rois, offset):
    dtype = input.dtype
    compute = _COMPUTE.get(dtype, ir.DataType.FLOAT)

    def const(value):
        return op.Constant(value=ir.tensor(np.asarray(value, dtype=compute.numpy())))

    rois = op.Cast(rois, to=compute)
    height, width = (op.Cast(op.Shape(input, start=d, end=d + 1), to=compute) for d in (2, 3))
    y, x = _positions(op, spec, rois, offset, const)  # (R, classes, PH, PW, n)
    ys, xs = _axis(op, spec, y, height, const), _axis(op, spec, x, width, const)
    # (B * H * W * G * G * classes, channels per class): the row of pixel, group and class.
    per_class = spec.channels // spec.classes
    groups = spec.group_size ** 2
    split = op.Concat(op.Shape(input, end=1), ints(op, spec.classes, per_class, groups),
                      op.Shape(input, start=2), axis=0)  # (B, classes, per class, G * G, H, W)
    rows = op.Transpose(op.Reshape(input, split), perm=[0, 4, 5, 3, 1, 2])
    rows = op.Reshape(rows, ints(op, -1, per_class))
    rows = op.Cast(rows, to=compute)
    # From here on (R, classes * bins, samples[, channels]): ranks of at most 4 (OpenVINO's CPU plugin
    # multiplied rank-7 broadcasts with a dynamic number of RoIs wrongly).
    units, n = spec.classes * spec.pooled[0] * spec.pooled[1], spec.sampling
    batch = op.Cast(op.Gather(rois, ints(op, 0), axis=1), to=ir.DataType.INT64)
    batch = op.Reshape(batch, ints(op, -1, 1, 1))
    bin_groups = [_group(spec, ph, pw) for ph in range(spec.pooled[0]) for pw in range(spec.pooled[1])]
    group_and_class = [g * spec.classes + k for k in range(spec.classes) for g in bin_groups]
    group_and_class = op.Reshape(ints(op, *group_and_class), ints(op, 1, units, 1))
    h_int, w_int = (op.Shape(input, start=d, end=d + 1) for d in (2, 3))

    def per_sample(t, axis: str):
        """(R, classes, PH, PW, n) -> (R, units, n * n): y values repeat along x, x values along y."""
        t = op.Reshape(t, ints(op, 0, units, n, 1) if axis == "y" else ints(op, 0, units, 1, n))
        return op.Reshape(op.Expand(t, ints(op, 1, 1, n, n)), ints(op, 0, units, n * n))

    ys = {k: per_sample(v, "y") for k, v in ys.items()}
    xs = {k: per_sample(v, "x") for k, v in xs.items()}
    valid = op.Mul(ys["valid"], xs["valid"])
    total = None
    for y_index, y_weight in ((ys["low"], ys["w_low"]), (ys["high"], ys["w_high"])):
        for x_index, x_weight in ((xs["low"], xs["w_low"]), (xs["high"], xs["w_high"])):
            pixel = op.Add(op.Mul(op.Add(op.Mul(batch, h_int), y_index), w_int), x_index)
            index = op.Add(op.Mul(pixel, ints(op, groups * spec.classes)), group_and_class)
            weight = op.Mul(op.Mul(y_weight, x_weight), valid)
            term = op.Mul(op.Gather(rows, index, axis=0), op.Unsqueeze(weight, ints(op, 3)))
            total = term if total is None else op.Add(total, term)
    summed = op.ReduceSum(total, ints(op, 2), keepdims=0)  # (R, units, per_class)
    if spec.rfcn:  # the average of the valid samples, 0 where none is
        count = op.Unsqueeze(op.ReduceSum(valid, ints(op, 2), keepdims=0), ints(op, 2))
        mean = op.Div(summed, op.Max(count, const(1.0)))
        out = op.Where(op.Greater(count, const(0.0)), mean, const(0.0))
    else:
        out = op.Div(summed, const(float(max(spec.sampling ** 2, 1))))
    out = op.Reshape(out, ints(op, 0, spec.classes, *spec.pooled, per_class))
    out = op.Reshape(op.Transpose(out, perm=[0, 1, 4, 2, 3]), ints(op, 0, spec.channels, *spec.pooled))
    return out if dtype == compute else op.Cast(out, to=dtype)


def _group(spec: RoiPoolExport, ph: int, pw: int) -> int:
    g = spec.group_size
    return min(ph * g // spec.pooled[0], g - 1) * g + min(pw * g // spec.pooled[1], g - 1)


def _positions(op, spec: RoiPoolExport, rois, offset, const):
    """Sample positions ``(R, classes, PH, PW, n)`` along y and along x, in input pixels."""
    column = {name: op.Gather(rois, ints(op, i), axis=1)
              for i, name in ((1, "x1"), (2, "y1"), (3, "x2"), (4, "y2"))}
    scale = const(spec.spatial_scale)
    if spec.rfcn:  # corners rounded half away from zero, the end pixel included, at least 0.1 wide
        column = {k: op.Mul(op.Sign(v), op.Floor(op.Add(op.Abs(v), const(0.5)))) for k, v in column.items()}
    half = const(0.5)
    starts, sizes = {}, {}
    for axis, (a, b) in (("y", ("y1", "y2")), ("x", ("x1", "x2"))):
        start = op.Sub(op.Mul(column[a], scale), half)
        end = column[b]
        if spec.rfcn:
            end = op.Add(end, const(1.0))
        size = op.Sub(op.Sub(op.Mul(end, scale), half), start)
        if spec.rfcn:
            size = op.Max(size, const(0.1))
        starts[axis], sizes[axis] = start, size  # (R, 1)
    out = []
    for axis, dim in (("y", 0), ("x", 1)):
        pooled, n = spec.pooled[dim], spec.sampling
        bin_size = op.Div(sizes[axis], const(float(pooled)))  # (R, 1)
        bins = np.arange(pooled, dtype=np.float64).reshape((1, 1, pooled, 1) if dim == 0 else
                                                           (1, 1, 1, pooled))
        # y0 + ph * bin_h: (R, 1, PH, 1) or (R, 1, 1, PW)
        base = op.Add(op.Reshape(starts[axis], ints(op, -1, 1, 1, 1)),
                      op.Mul(const(bins), op.Reshape(bin_size, ints(op, -1, 1, 1, 1))))
        if offset is not None:
            base = op.Add(base, op.Mul(_bin_offsets(op, spec, offset, 1 - dim, rois),
                                       op.Reshape(op.Mul(const(spec.offset_scale), sizes[axis]),
                                                  ints(op, -1, 1, 1, 1))))
        step = op.Reshape(op.Div(bin_size, const(float(n))), ints(op, -1, 1, 1, 1, 1))
        samples = const((np.arange(n, dtype=np.float64) + spec.align).reshape(1, 1, 1, 1, n))
        out.append(op.Add(op.Unsqueeze(base, ints(op, 4)), op.Mul(samples, step)))
    # Both (R, classes, PH, PW, n): broadcast the axis that does not vary.
    shape = op.Concat(op.Shape(rois, end=1), ints(op, spec.classes, *spec.pooled, spec.sampling), axis=0)
    return tuple(op.Expand(p, shape) for p in out)


def _bin_offsets(op, spec: RoiPoolExport, offset, component: int, like):
    """Offset ``component`` (0: x, 1: y) of each bin's part, in ``like``'s dtype: ``(R, classes, PH, PW)``."""
    ph_part = [ph * spec.parts[0] // spec.pooled[0] for ph in range(spec.pooled[0])]
    pw_part = [pw * spec.parts[1] // spec.pooled[1] for pw in range(spec.pooled[1])]
    per_class = op.Reshape(op.CastLike(offset, like), ints(op, 0, spec.classes, 2, *spec.parts))
    part = op.Gather(per_class, ints(op, component), axis=2)  # (R, classes, 1, part_h, part_w)
    part = op.Gather(op.Gather(part, ints(op, *ph_part), axis=3), ints(op, *pw_part), axis=4)
    return op.Squeeze(part, ints(op, 2))


def _axis(op, spec: RoiPoolExport, position, size, const) -> dict:
    """RoIAlign's clamped interpolation along one axis (``clamp_axis`` in ``csrc/roi_pool.h``):
    validity (1 or 0), the two pixels read and their weights, all of ``position``'s shape."""
    last = op.Sub(size, const(1.0))
    margin = const(spec.margin)
    valid = op.And(op.GreaterOrEqual(position, op.Neg(margin)),
                   op.LessOrEqual(position, op.Add(last, margin)))
    # Invalid positions (far outside, or NaN) read pixel 0 with weight 0: indices must stay in the image.
    clamped = op.Min(op.Max(op.Where(valid, position, const(0.0)), const(0.0)), last)
    low = op.Floor(clamped)
    high = op.Min(op.Add(low, const(1.0)), last)
    w_high = op.Sub(clamped, low)
    return dict(valid=op.CastLike(valid, position), low=op.Cast(low, to=ir.DataType.INT64),
                high=op.Cast(high, to=ir.DataType.INT64), w_low=op.Sub(const(1.0), w_high), w_high=w_high)
