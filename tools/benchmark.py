#!/usr/bin/env python
"""Benchmark dcn_plugin's deformable convolution and RoI pooling against their plain versions and peers.

Two suites share the timing and reporting code; ``--op`` picks one.

``--op conv`` (default): for each case (a named ``DeformConvShape``) this program times, in one
process and on the same inputs, the forward and the forward+backward (gradients for input, weight,
offset and mask) of:

- ``dcn_plugin``: ``dcn_plugin.ops.deform_conv{N}d`` / ``deform_conv_transpose{N}d``;
- ``F.conv*``: torch's own convolution of the same shape without offsets or mask, the floor
  every ratio is measured against;
- every peer that imports: ``torchvision.ops.deform_conv2d``, ``mmcv.ops`` (mmcv-full),
  ``tvdcn.ops``, and onnxruntime's ``DeformConv`` (a one-node ONNX model on the CPU, with as many
  threads as torch; forward only, as onnxruntime runs inference).

``--op roi``: for each case (a named ``RoiPoolShape``), ``dcn_plugin.ops.deform_roi_pool`` (mmcv's
deformable RoI pooling) or ``deform_psroi_pool`` (R-FCN's) with offsets (gradients for input and
offset), against the same op without offsets (RoIAlign, or R-FCN's pooling with ``no_trans``), the
baseline of the ratios, and the peers that import: ``torchvision.ops.roi_align`` and ``mmcv.ops``.

It reports median times, each time as a multiple of the baseline's, and on CUDA the peak
memory above the inputs. A peer that cannot run a case shows ``n/a`` with the reason in a
footnote. It asserts nothing about speed. ``--plot`` draws the same results: per case, each
implementation's time as a multiple of plain convolution's.

Examples::

    python tools/benchmark.py --threads 2
    python tools/benchmark.py --threads 2 --markdown benchmarks/cpu-2core-float32.md \
        --plot benchmarks/cpu-2core-float32.png
    python tools/benchmark.py --op roi --threads 2
    python tools/benchmark.py --device cuda --dtype bfloat16 --autocast --markdown bench.md
    python tools/benchmark.py --list
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import dcn_plugin
from dcn_plugin.ops.shapes import DeformConvShape

Tensors = Dict[str, Optional[Tensor]]
"""The inputs of one case: ``input``, ``weight``, ``offset``, ``mask`` (None if absent)."""

# ResNet stages are C_in = C_out, 3x3, padding 1, with offsets and a mask (DCNv2).
_2D = dict(n=2, kernel=3)
CPU_CASES: Dict[str, DeformConvShape] = {
    "c3": DeformConvShape.build(**_2D, batch=2, in_channels=128, out_channels=128, in_size=50),
    "c4": DeformConvShape.build(**_2D, batch=2, in_channels=256, out_channels=256, in_size=25),
    "c2-b8": DeformConvShape.build(**_2D, batch=8, in_channels=64, out_channels=64, in_size=32),
    "c3-nomask": DeformConvShape.build(**_2D, batch=2, in_channels=128, out_channels=128, in_size=50,
                                       mask_groups=0),
    "c3-s2": DeformConvShape.build(**_2D, batch=2, in_channels=128, out_channels=128, in_size=50, stride=2),
    "c3-og4": DeformConvShape.build(**_2D, batch=2, in_channels=128, out_channels=128, in_size=40,
                                    offset_groups=4, mask_groups=4),
    "dw": DeformConvShape.build(**_2D, batch=2, in_channels=256, out_channels=256, in_size=32, groups=256),
    # The quick-start detector's deformable layers (ResNet-18 at half width, 128 px, batch 16).
    "qs-64": DeformConvShape.build(**_2D, batch=16, in_channels=64, out_channels=64, in_size=16),
    "qs-128": DeformConvShape.build(**_2D, batch=16, in_channels=128, out_channels=128, in_size=8),
    "qs-256": DeformConvShape.build(**_2D, batch=16, in_channels=256, out_channels=256, in_size=4),
    "1d": DeformConvShape.build(1, batch=8, in_channels=64, out_channels=64, in_size=512, kernel=3),
    "3d": DeformConvShape.build(3, batch=1, in_channels=16, out_channels=16, in_size=16, kernel=3),
    "t2d": DeformConvShape.build(2, batch=2, in_channels=64, out_channels=64, in_size=32, kernel=4, stride=2,
                                 transposed=True),
}
# ResNet-50 DCN stages of a detector at batch 8 (800x1216 images), and the other kinds, on a GPU.
GPU_CASES: Dict[str, DeformConvShape] = {
    "r50-c3": DeformConvShape.build(**_2D, batch=8, in_channels=128, out_channels=128, in_size=(100, 152)),
    "r50-c4": DeformConvShape.build(**_2D, batch=8, in_channels=256, out_channels=256, in_size=(50, 76)),
    "r50-c5": DeformConvShape.build(**_2D, batch=8, in_channels=512, out_channels=512, in_size=(25, 38)),
    "r50-dw": DeformConvShape.build(**_2D, batch=8, in_channels=256, out_channels=256, in_size=(50, 76),
                                    groups=256),
    "3d-64": DeformConvShape.build(3, batch=2, in_channels=64, out_channels=64, in_size=32, kernel=3),
    "t2d-256": DeformConvShape.build(2, batch=8, in_channels=256, out_channels=128, in_size=(50, 76),
                                     kernel=4, stride=2, transposed=True),
}


def make_inputs(name: str, case: DeformConvShape, device: str, dtype: torch.dtype) -> Tensors:
    """Deterministic inputs: offsets ~ N(0, 1.5^2) pixels, mask = sigmoid(N(0, 1)) as a DCNv2 layer gives."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    fan_in = case.weight_shape[1] * case.kernel_points
    tensors: Tensors = {
        "input": torch.randn(case.batch, case.in_channels, *case.in_size, generator=gen),
        "weight": torch.randn(case.weight_shape, generator=gen) / math.sqrt(fan_in),
        "offset": torch.randn(case.offset_shape, generator=gen) * 1.5 if case.offset_groups else None,
        "mask": torch.randn(case.mask_shape, generator=gen).sigmoid() if case.mask_groups else None,
    }
    return {k: None if t is None else t.to(device=device, dtype=dtype) for k, t in tensors.items()}


# --------------------------------------------------------------------------------------------
# Implementations: run(case, tensors) -> output; raise Unsupported for a case they cannot run.


class Unsupported(Exception):
    """An implementation's reason for not running a case (shown as n/a)."""


def _run_dcn_plugin(case: DeformConvShape, t: Tensors) -> Tensor:
    if case.transposed:
        fn = getattr(dcn_plugin.ops, f"deform_conv_transpose{case.n}d")
        return fn(t["input"], t["weight"], t["offset"], t["mask"], None, case.stride, case.padding,
                  case.output_padding, case.dilation, case.groups)
    fn = getattr(dcn_plugin.ops, f"deform_conv{case.n}d")
    return fn(t["input"], t["weight"], t["offset"], t["mask"], None, case.stride, case.padding, case.dilation,
              case.groups)


def _run_torch_conv(case: DeformConvShape, t: Tensors) -> Tensor:
    x, w = t["input"], t["weight"]
    if case.transposed:
        return getattr(F, f"conv_transpose{case.n}d")(x, w, None, case.stride, case.padding,
                                                       case.output_padding, case.groups, case.dilation)
    return getattr(F, f"conv{case.n}d")(x, w, None, case.stride, case.padding, case.dilation, case.groups)


def _check_2d_forward(case: DeformConvShape, t: Tensors, peer: str) -> None:
    if case.n != 2 or case.transposed or t["offset"] is None:
        raise Unsupported(f"{peer} has only 2d forward deformable convolution with an offset")


def _torchvision() -> Callable[[DeformConvShape, Tensors], Tensor]:
    from torchvision.ops import deform_conv2d

    def run(case: DeformConvShape, t: Tensors) -> Tensor:
        _check_2d_forward(case, t, "torchvision")
        return deform_conv2d(t["input"], t["offset"], t["weight"], None, stride=case.stride,
                             padding=case.padding, dilation=case.dilation, mask=t["mask"])

    return run


def _mmcv() -> Callable[[DeformConvShape, Tensors], Tensor]:
    from mmcv.ops import deform_conv2d, modulated_deform_conv2d

    def run(case: DeformConvShape, t: Tensors) -> Tensor:
        _check_2d_forward(case, t, "mmcv")
        if t["mask"] is None:
            return deform_conv2d(t["input"], t["offset"], t["weight"], case.stride, case.padding,
                                 case.dilation, case.groups, case.offset_groups)
        if case.mask_groups != case.offset_groups:
            raise Unsupported("mmcv needs as many mask groups as offset groups")
        return modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], None, case.stride,
                                       case.padding, case.dilation, case.groups, case.offset_groups)

    return run


def _tvdcn() -> Callable[[DeformConvShape, Tensors], Tensor]:
    import tvdcn.ops

    def run(case: DeformConvShape, t: Tensors) -> Tensor:
        kwargs = dict(offset=t["offset"], mask=t["mask"], stride=case.stride, padding=case.padding,
                      dilation=case.dilation, groups=case.groups)
        if case.transposed:
            return getattr(tvdcn.ops, f"deform_conv_transpose{case.n}d")(
                t["input"], t["weight"], output_padding=case.output_padding, **kwargs)
        return getattr(tvdcn.ops, f"deform_conv{case.n}d")(t["input"], t["weight"], **kwargs)

    return run


def _onnx_deform_conv(case: DeformConvShape, dtype: torch.dtype, with_mask: bool) -> bytes:
    """A one-node ONNX model (opset 19) of ``DeformConv`` for ``case``: inputs X, W, offset[, mask]."""
    from onnx import TensorProto, helper

    elem = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}[dtype]
    shapes = {"X": (case.batch, case.in_channels, *case.in_size), "W": case.weight_shape,
              "offset": case.offset_shape, "mask": case.mask_shape}
    names = ["X", "W", "offset", *(("mask",) if with_mask else ())]
    node = helper.make_node("DeformConv", ["X", "W", "offset", *(("", "mask") if with_mask else ())], ["Y"],
                            dilations=list(case.dilation), group=case.groups, kernel_shape=list(case.kernel),
                            offset_group=case.offset_groups, pads=list(case.padding) * 2,
                            strides=list(case.stride))
    graph = helper.make_graph(
        [node], "deform_conv", [helper.make_tensor_value_info(n, elem, list(shapes[n])) for n in names],
        [helper.make_tensor_value_info("Y", elem, [case.batch, case.out_channels, *case.out_size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return model.SerializeToString()


def _onnxruntime() -> Callable[[DeformConvShape, Tensors], Tensor]:
    import onnxruntime as ort

    sessions: Dict[tuple, ort.InferenceSession] = {}

    def session(case: DeformConvShape, dtype: torch.dtype, with_mask: bool) -> ort.InferenceSession:
        key = (case, dtype, with_mask)
        if key not in sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch
            options.inter_op_num_threads = 1
            sessions[key] = ort.InferenceSession(_onnx_deform_conv(case, dtype, with_mask), options,
                                                 providers=["CPUExecutionProvider"])
        return sessions[key]

    def run(case: DeformConvShape, t: Tensors) -> Tensor:
        _check_2d_forward(case, t, "onnxruntime")
        if any(v is not None and v.requires_grad for v in t.values()):
            raise Unsupported("onnxruntime runs inference only: no backward")
        if t["input"].device.type != "cpu" or t["input"].dtype not in (torch.float32, torch.float64):
            raise Unsupported("the onnxruntime peer runs float32/float64 on the CPU")
        if t["mask"] is not None and case.mask_groups != case.offset_groups:
            raise Unsupported("ONNX DeformConv needs as many mask groups as offset groups")
        feeds = {"X": t["input"], "W": t["weight"], "offset": t["offset"], "mask": t["mask"]}
        feeds = {k: v.contiguous().numpy() for k, v in feeds.items() if v is not None}
        (out,) = session(case, t["input"].dtype, t["mask"] is not None).run(None, feeds)
        return torch.from_numpy(out)

    return run


def load_implementations() -> tuple[Dict[str, Callable], List[str]]:
    """The implementations that import, and a note for each peer that does not."""
    impls = {"dcn_plugin": _run_dcn_plugin, "F.conv": _run_torch_conv}
    peers = {"torchvision": _torchvision, "mmcv": _mmcv, "tvdcn": _tvdcn, "onnxruntime": _onnxruntime}
    return impls, load_peers(impls, peers)


def load_peers(impls: Dict[str, Callable], loaders: Dict[str, Callable[[], Callable]]) -> List[str]:
    """Adds each peer that imports to ``impls``; returns a note for each one that does not."""
    notes = []
    for name, loader in loaders.items():
        try:
            impls[name] = loader()
        except Exception as exc:  # a peer that does not import is not benchmarked
            notes.append(f"{name}: not benchmarked ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return notes


# --------------------------------------------------------------------------------------------
# Deformable RoI pooling: cases, inputs, implementations


@dataclass(frozen=True)
class RoiPoolShape:
    """One call of ``deform_roi_pool`` (``kind="roi"``) or ``deform_psroi_pool`` (``"psroi"``):
    ``rois`` RoIs on a ``batch x channels x size`` map, ``pooled x pooled`` bins. RoIs are boxes of
    32 to 512 image pixels (log-uniform) on an image of ``size / spatial_scale``."""

    kind: str
    channels: int
    size: Tuple[int, int]
    rois: int
    batch: int = 1
    pooled: int = 7
    spatial_scale: float = 1 / 16
    sampling_ratio: int = 0  # roi: mmdetection's dpool default (adaptive)
    gamma: float = 0.1
    group_size: int = 1  # psroi
    sample_per_part: int = 4
    trans_std: float = 0.1

    @property
    def output_dim(self) -> int:
        return self.channels // self.group_size ** 2

    def describe(self) -> str:
        rule = f"sr{self.sampling_ratio}" if self.kind == "roi" else \
            f"PS g{self.group_size} spp{self.sample_per_part}"
        return (f"{self.rois} RoIs {self.batch}x{self.channels}x{self.size[0]}x{self.size[1]}"
                f"->{self.pooled}x{self.pooled} {rule}")


# 512 RoIs on a ResNet-50 C4 / FPN level map of an 800x1216 image: mmdetection's dpool Faster R-CNN
# (mmcv's op) and Deformable ConvNets' Faster R-CNN (R-FCN's op, class-agnostic, group_size 1); and
# R-FCN's position-sensitive head (21 classes x 7 x 7 score maps).
_MAP = dict(channels=256, size=(50, 76), rois=512)
ROI_CASES: Dict[str, RoiPoolShape] = {
    "roi": RoiPoolShape("roi", **_MAP),
    "psroi": RoiPoolShape("psroi", **_MAP),
    "psroi-rfcn": RoiPoolShape("psroi", channels=21 * 49, size=(50, 76), rois=300, group_size=7),
    "smoke-roi": RoiPoolShape("roi", channels=8, size=(10, 12), rois=6, pooled=3),
    "smoke-psroi": RoiPoolShape("psroi", channels=8, size=(10, 12), rois=6, pooled=3, group_size=2),
}
ROI_GPU_CASES: Dict[str, RoiPoolShape] = {
    **{name: case for name, case in ROI_CASES.items() if not name.startswith("smoke")},
    "gpu-roi-b8": RoiPoolShape("roi", channels=256, size=(50, 76), rois=8 * 512, batch=8),
}


def make_roi_inputs(name: str, case: RoiPoolShape, device: str, dtype: torch.dtype) -> Tensors:
    """Deterministic ``input``, ``rois`` (float32) and ``offset`` ~ N(0, 1) (scaled by gamma or
    trans_std in the op)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    height, width = (s / case.spatial_scale for s in case.size)
    sides = torch.exp(torch.empty(case.rois, 2).uniform_(math.log(32), math.log(512), generator=gen))
    centres = torch.rand(case.rois, 2, generator=gen) * torch.tensor([width, height])
    index = torch.randint(0, case.batch, (case.rois, 1), generator=gen).float()
    rois = torch.cat([index, centres - sides / 2, centres + sides / 2], 1)
    tensors: Tensors = {
        "input": torch.randn(case.batch, case.channels, *case.size, generator=gen),
        "offset": torch.randn(case.rois, 2, case.pooled, case.pooled, generator=gen),  # one offset class
    }
    tensors = {k: t.to(device=device, dtype=dtype) for k, t in tensors.items()}
    return {**tensors, "rois": rois.to(device)}


def _run_roi_pool(case: RoiPoolShape, t: Tensors, offset: bool = True) -> Tensor:
    t_offset = t["offset"] if offset else None
    if case.kind == "roi":
        return dcn_plugin.ops.deform_roi_pool(t["input"], t["rois"], t_offset, case.pooled,
                                              case.spatial_scale, case.sampling_ratio, case.gamma)
    return dcn_plugin.ops.deform_psroi_pool(t["input"], t["rois"], t_offset, case.spatial_scale,
                                            case.output_dim, case.group_size, case.pooled, case.pooled,
                                            case.sample_per_part, case.trans_std)


def _torchvision_roi() -> Callable[[RoiPoolShape, Tensors], Tensor]:
    from torchvision.ops import roi_align

    def run(case: RoiPoolShape, t: Tensors) -> Tensor:
        if case.kind != "roi":
            raise Unsupported("torchvision has no deformable (or R-FCN) position-sensitive pooling")
        return roi_align(t["input"], t["rois"].to(t["input"].dtype), case.pooled, case.spatial_scale,
                         case.sampling_ratio, aligned=True)  # RoIAlign without offsets

    return run


def _mmcv_roi() -> Callable[[RoiPoolShape, Tensors], Tensor]:
    from mmcv.ops import deform_roi_pool

    def run(case: RoiPoolShape, t: Tensors) -> Tensor:
        if case.kind != "roi":
            raise Unsupported("mmcv has no position-sensitive deformable RoI pooling")
        return deform_roi_pool(t["input"], t["rois"].to(t["input"].dtype), t["offset"], case.pooled,
                               case.spatial_scale, case.sampling_ratio, case.gamma)

    return run


def load_roi_implementations() -> tuple[Dict[str, Callable], List[str]]:
    """dcn_plugin with and without offsets, and the peers that import (with a note for the others)."""
    impls: Dict[str, Callable] = {
        "dcn_plugin": _run_roi_pool,
        "no offset": lambda case, t: _run_roi_pool(case, t, offset=False),
    }
    return impls, load_peers(impls, {"torchvision roi_align": _torchvision_roi, "mmcv": _mmcv_roi})


# --------------------------------------------------------------------------------------------
# Suites: what --op selects


@dataclass(frozen=True)
class Suite:
    """The cases and implementations of one op family; the timing and reporting below are shared."""

    cpu_cases: Dict[str, Any]
    gpu_cases: Dict[str, Any]
    make_inputs: Callable[[str, Any, str, torch.dtype], Tensors]
    load_implementations: Callable[[], tuple[Dict[str, Callable], List[str]]]
    baseline: str  # the implementation every ratio is to
    grads: Callable[[str], Tuple[str, ...]]  # per implementation: the tensors that require grad
    method: str  # the inputs and gradients, for the report


SUITES: Dict[str, Suite] = {
    "conv": Suite(CPU_CASES, GPU_CASES, make_inputs, lambda: load_implementations(), "F.conv",
                  lambda impl: ("input", "weight") + (() if impl == "F.conv" else ("offset", "mask")),
                  "backward with a random output gradient, input, weight, offset and mask requiring grad; "
                  "ratios are to F.conv of the same shape without offsets"),
    "roi": Suite(ROI_CASES, ROI_GPU_CASES, make_roi_inputs, lambda: load_roi_implementations(), "no offset",
                 lambda impl: ("input", "offset") if impl in ("dcn_plugin", "mmcv") else ("input",),
                 "backward with a random output gradient, input and offset requiring grad (input only "
                 "without offsets); ratios are to the same dcn_plugin op without offsets"),
}


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Median milliseconds and peak MiB above the inputs (CUDA), or why there is none."""

    ms: Optional[float] = None
    peak_mib: Optional[float] = None
    error: Optional[str] = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(step: Callable[[], None], device: str, min_time: float, repeats: int) -> Timing:
    """Median of at least ``repeats`` timed calls lasting about ``min_time`` s, after one warm-up."""
    gc.collect()
    try:
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        estimate = time.perf_counter() - start
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        times = []
        for _ in range(max(repeats, min(1000, math.ceil(min_time / max(estimate, 1e-6))))):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    except Exception as exc:  # a case an implementation cannot run is reported, not fatal
        return Timing(error=str(exc).splitlines()[0][:160] if isinstance(exc, Unsupported) else
                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:140]}")
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if device == "cuda" else None
    return Timing(ms=1e3 * statistics.median(times), peak_mib=peak)


def _steps(run: Callable, case, tensors: Tensors, args, grads: Tuple[str, ...]):
    """The forward and forward+backward steps of ``run`` on ``tensors`` (under autocast, if asked),
    the tensors named in ``grads`` requiring grad."""
    autocast = dict(device_type=args.device, dtype=DTYPES[args.dtype], enabled=args.autocast)
    leaves = {k: None if t is None else t.detach().requires_grad_(k in grads) for k, t in tensors.items()}
    grad_output: List[Tensor] = []

    def forward() -> None:
        with torch.no_grad(), torch.autocast(**autocast):
            run(case, tensors)

    def forward_backward() -> None:
        for t in leaves.values():
            if t is not None:
                t.grad = None
        with torch.autocast(**autocast):
            out = run(case, leaves)
        if not grad_output:
            grad_output.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out))
        out.backward(grad_output[0])

    return forward, forward_backward


@dataclass
class Result:
    case: str
    shape: str
    impl: str
    fwd: Timing
    fwd_bwd: Timing
    fwd_vs_baseline: Optional[float] = None
    fwd_bwd_vs_baseline: Optional[float] = None


def run_case(name: str, case, suite: Suite, impls: Dict[str, Callable], args) -> List[Result]:
    tensor_dtype = torch.float32 if args.autocast else DTYPES[args.dtype]
    tensors = suite.make_inputs(name, case, args.device, tensor_dtype)
    results = []
    for impl, run in impls.items():
        forward, forward_backward = _steps(run, case, tensors, args, suite.grads(impl))
        fwd = measure(forward, args.device, args.min_time, args.repeats)
        fwd_bwd = fwd if fwd.error else measure(forward_backward, args.device, args.min_time, args.repeats)
        results.append(Result(name, case.describe(), impl, fwd, fwd_bwd))
    base = next(r for r in results if r.impl == suite.baseline)
    for r in results:
        r.fwd_vs_baseline = r.fwd.ms / base.fwd.ms if r.fwd.ms and base.fwd.ms else None
        r.fwd_bwd_vs_baseline = r.fwd_bwd.ms / base.fwd_bwd.ms if r.fwd_bwd.ms and base.fwd_bwd.ms else None
    return results


# --------------------------------------------------------------------------------------------
# Reporting


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(args) -> Dict[str, str]:
    device = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_model()
    return {
        "device": f"{args.device}: {device}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime"),
        "threads": str(torch.get_num_threads()),
        "dtype": args.dtype + (" (autocast, float32 tensors)" if args.autocast else ""),
        "date": datetime.date.today().isoformat(),
    }


def table(results: Sequence[Result], memory: bool,
          baseline: str = "conv") -> tuple[List[str], List[List[str]], List[str]]:
    """Header, rows and footnotes (the n/a reasons, numbered in order of appearance)."""
    header = ["case", "shape", "impl", "fwd ms", "fwd+bwd ms", f"fwd / {baseline}", f"fwd+bwd / {baseline}"]
    header += ["peak MiB (f+b)"] if memory else []
    reasons: List[str] = []

    def time_cell(t: Timing) -> str:
        if t.ms is None:
            if t.error not in reasons:
                reasons.append(t.error)
            return f"n/a [{reasons.index(t.error) + 1}]"
        return f"{t.ms:.3g}" if t.ms < 100 else f"{t.ms:.0f}"

    rows = []
    for i, r in enumerate(results):
        first = i == 0 or results[i - 1].case != r.case
        ratios = ["-" if x is None else f"{x:.2f}x" for x in (r.fwd_vs_baseline, r.fwd_bwd_vs_baseline)]
        row = [r.case if first else "", r.shape if first else "", r.impl, time_cell(r.fwd),
               time_cell(r.fwd_bwd), *ratios]
        if memory:
            row.append("-" if r.fwd_bwd.peak_mib is None else f"{r.fwd_bwd.peak_mib:.1f}")
        rows.append(row)
    return header, rows, [f"[{i + 1}] {reason}" for i, reason in enumerate(reasons)]


def plot(results: Sequence[Result], path: Path, title: str, baseline: str) -> None:
    """Per case, each implementation's forward and forward+backward time as a multiple of the
    baseline's (log scale), one bar per implementation that ran; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    cases = list(dict.fromkeys(r.case for r in results))
    impls = [i for i in dict.fromkeys(r.impl for r in results) if i != baseline]
    by_key = {(r.case, r.impl): r for r in results}
    width = 0.8 / max(len(impls), 1)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.75 * len(cases) + 2), 7), sharex=True)
    panels = ((axes[0], "fwd_vs_baseline", "forward"), (axes[1], "fwd_bwd_vs_baseline", "forward+backward"))
    for ax, attr, label in panels:
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for i, case in enumerate(cases):
                ratio = getattr(by_key[(case, impl)], attr) if (case, impl) in by_key else None
                if ratio:
                    xs.append(i + (k - (len(impls) - 1) / 2) * width)
                    ys.append(ratio)
            bars = ax.bar(xs, ys, width, label=impl)
            ax.bar_label(bars, fmt="%.2g", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if v in (0.2, 0.5, 2, 5) else ""))
        ax.set_ylabel(f"{label} / {baseline}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(ncol=len(impls), fontsize="small")
    axes[0].set_title(title, fontsize="medium")
    axes[1].set_xticks(range(len(cases)), cases, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if "ms" in h or "/" in h or "MiB" in h
                                                               else ":---" for h in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def text(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


# --------------------------------------------------------------------------------------------
# Command line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=list(SUITES), default="conv",
                        help="conv: deformable convolution; roi: deformable RoI pooling (both ops)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--autocast", action="store_true",
                        help="float32 tensors, forward under torch.autocast(dtype=--dtype), as in training")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    parser.add_argument("--cases", help="comma-separated case names or globs (default: the device's cases)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--repeats", type=int, default=3, help="minimum timed calls per measurement")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per measurement")
    parser.add_argument("--markdown", type=Path, help="also write a Markdown report here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="also plot each implementation's time / the baseline's "
                                                  "per case to this image (PNG)")
    args = parser.parse_args(argv)
    if args.autocast and args.dtype not in ("float16", "bfloat16"):
        parser.error("--autocast needs --dtype float16 or bfloat16")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    return args


def select_cases(args) -> Dict[str, Any]:
    suite = SUITES[args.op]
    cases = suite.gpu_cases if args.device == "cuda" else suite.cpu_cases
    if not args.cases:
        return cases
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    every = {**suite.cpu_cases, **suite.gpu_cases}
    unknown = [p for p in patterns if not fnmatch.filter(every, p)]
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(unknown)}; known: {', '.join(every)}")
    return {name: case for name, case in {**cases, **every}.items() if any(fnmatch.fnmatch(name, p)
                                                                           for p in patterns)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    suite = SUITES[args.op]
    if args.list:
        for name, case in {**suite.cpu_cases, **suite.gpu_cases}.items():
            devices = "cpu" if name in suite.cpu_cases else "gpu"
            print(f"{name:12s} {devices}  {case.describe()}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    impls, notes = suite.load_implementations()
    env = environment(args)
    print("  ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    results: List[Result] = []
    for name, case in select_cases(args).items():
        start = time.perf_counter()
        results += run_case(name, case, suite, impls, args)
        elapsed = time.perf_counter() - start
        print(f"  {name} ({case.describe()}) in {elapsed:.1f} s", file=sys.stderr, flush=True)
    header, rows, footnotes = table(results, memory=args.device == "cuda", baseline=suite.baseline)
    method = (f"median of >= {args.repeats} calls (about {args.min_time:g} s) after a warm-up call; "
              + suite.method + ("; peak MiB = max_memory_allocated above the inputs during forward+backward"
                                if args.device == "cuda" else ""))
    print("\n" + text(header, rows) + "\n" + "\n".join(footnotes + notes))
    if args.markdown:
        lines = ["# dcn_plugin benchmark", "", *[f"- **{k}**: {v}" for k, v in env.items()],
                 f"- **method**: {method}", "", markdown(header, rows), "", *[f"{f}  " for f in footnotes],
                 *[f"- {note}" for note in notes]]
        args.markdown.write_text("\n".join(lines).rstrip() + "\n")
    if args.plot:
        title = f"{env['device']}, {env['threads']} threads, {env['dtype']}, torch {env['torch']}"
        plot(results, args.plot, title, suite.baseline)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "method": method, "notes": notes,
                                         "results": [asdict(r) for r in results]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
