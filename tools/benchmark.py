#!/usr/bin/env python
"""Benchmark dcn_plugin's deformable convolution against plain convolution and its peers.

For a fixed list of cases (ResNet stage shapes, stride 2, depthwise, several offset groups, 1d,
3d, transposed 2d; with ``--device cuda``, by default the ``gpu-*`` cases: ResNet-50 DCNv2
stages at batch 8, depthwise, 3d and transposed 2d at GPU sizes) this program times, in one
process and on the same inputs:

- ``dcn_plugin``: ``dcn_plugin.ops.deform_conv{N}d`` / ``deform_conv_transpose{N}d``;
- ``F.conv*``: torch's own ``F.conv{N}d`` / ``F.conv_transpose{N}d`` of the same shape, without
  offsets or mask (the floor any deformable convolution is measured against);
- ``reference``: the pure-PyTorch ``tests/reference.py`` (slow; by default only on small cases);
- every peer that imports: ``torchvision.ops.deform_conv2d``, ``mmcv.ops`` (mmcv-full only;
  mmcv-lite has no ops) and ``tvdcn.ops``.

For each it reports the median forward time and forward+backward time (gradients for input,
weight, offset and mask), the ratio of each time to plain convolution's, and on CUDA the peak
memory allocated above the inputs. A peer that cannot run a case shows ``n/a`` with the reason
in a footnote. This is a program, not a test: it asserts nothing about speed.

Examples::

    python tools/benchmark.py --threads 2
    python tools/benchmark.py --device cuda --dtype float16 --cases c3,c4 --markdown bench.md
    python tools/benchmark.py --device cuda --dtype bfloat16 --autocast --json bench.json
    python tools/benchmark.py --list
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import importlib.metadata
import inspect
import json
import math
import os
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

REPO_ROOT = Path(__file__).resolve().parents[1]

try:
    import dcn_plugin
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(REPO_ROOT))
    import dcn_plugin

Tensors = Dict[str, Optional[Tensor]]
"""The inputs of one case: ``input``, ``weight``, ``offset``, ``mask``, ``bias`` (None if absent)."""

# --------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    """One benchmark shape.

    ``offset_groups == 0`` means no offset and ``mask_groups == 0`` no mask. Offset and mask live
    on the output grid for convolution and on the input grid for the transposed op.
    """

    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: Tuple[int, ...]
    kernel: Tuple[int, ...]
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    output_padding: int = 0
    groups: int = 1
    offset_groups: int = 1
    mask_groups: int = 1
    transposed: bool = False

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def kernel_points(self) -> int:
        return math.prod(self.kernel)

    @property
    def out_size(self) -> Tuple[int, ...]:
        s, p, d, op = self.stride, self.padding, self.dilation, self.output_padding
        if self.transposed:
            return tuple((i - 1) * s - 2 * p + d * (k - 1) + op + 1 for i, k in zip(self.size, self.kernel))
        return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1 for i, k in zip(self.size, self.kernel))

    @property
    def grid(self) -> Tuple[int, ...]:
        """Where offsets and mask live: the output grid, or the input grid when transposed."""
        return self.size if self.transposed else self.out_size

    @property
    def sampled_elements(self) -> int:
        """Number of sampled values (the size of the column buffer): a proxy for the op's cost."""
        channels = self.out_channels if self.transposed else self.in_channels
        return self.batch * channels * self.kernel_points * math.prod(self.grid)

    def describe(self) -> str:
        """A compact shape string, e.g. ``2x128x50x50->128x50x50 k3x3 s2 p1 og4 mg4``."""
        dims = lambda values: "x".join(map(str, values))  # noqa: E731
        shape_in = f"{self.batch}x{self.in_channels}x{dims(self.size)}"
        parts = [f"{shape_in}->{self.out_channels}x{dims(self.out_size)}", "k" + dims(self.kernel)]
        for label, value, default in (("s", self.stride, 1), ("p", self.padding, 0), ("d", self.dilation, 1),
                                      ("op", self.output_padding, 0), ("g", self.groups, 1)):
            if value != default:
                parts.append(f"{label}{value}")
        for label, value in (("og", self.offset_groups), ("mg", self.mask_groups)):
            if value == 0:
                parts.append("no-offset" if label == "og" else "no-mask")
            elif value > 1:
                parts.append(f"{label}{value}")
        if self.transposed:
            parts.insert(0, "T")
        return " ".join(parts)


CASES: List[Case] = [
    # ResNet stages (C_in = C_out, 3x3, pad 1) with offsets and a mask (DCNv2).
    Case("c3", 2, 128, 128, (50, 50), (3, 3), padding=1),
    Case("c4", 2, 256, 256, (25, 25), (3, 3), padding=1),
    Case("c2-b8", 8, 64, 64, (32, 32), (3, 3), padding=1),
    # Variants of the c3 shape.
    Case("c3-nomask", 2, 128, 128, (50, 50), (3, 3), padding=1, mask_groups=0),
    Case("c3-s2", 2, 128, 128, (50, 50), (3, 3), stride=2, padding=1),
    Case("c3-og4", 2, 128, 128, (50, 50), (3, 3), padding=1, offset_groups=4, mask_groups=4),
    Case("dw", 2, 256, 256, (32, 32), (3, 3), padding=1, groups=256),
    # Other dimensions and the transposed op.
    Case("1d", 8, 64, 64, (512,), (3,), padding=1),
    Case("3d", 1, 16, 16, (16, 16, 16), (3, 3, 3), padding=1),
    Case("t2d", 2, 64, 64, (32, 32), (4, 4), stride=2, padding=1, transposed=True),
]

# The GPU cases (the default with --device cuda): ResNet-50 DCNv2 stages of a detector at batch 8
# (offsets and mask, 3x3), and a depthwise, a 3d and a transposed 2d case of GPU size.
GPU_CASES: List[Case] = [
    Case("gpu-c3", 8, 128, 128, (100, 152), (3, 3), padding=1),
    Case("gpu-c4", 8, 256, 256, (50, 76), (3, 3), padding=1),
    Case("gpu-c5", 8, 512, 512, (25, 38), (3, 3), padding=1),
    Case("gpu-dw", 8, 256, 256, (50, 76), (3, 3), padding=1, groups=256),
    Case("gpu-3d", 2, 32, 32, (16, 48, 48), (3, 3, 3), padding=1),
    Case("gpu-t2d", 8, 128, 64, (50, 76), (4, 4), stride=2, padding=1, transposed=True),
]
ALL_CASES = CASES + GPU_CASES


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, offset_scale: float,
                bias: bool) -> Tensors:
    """Deterministic inputs for ``case`` (the same on every device), converted to ``dtype``.

    Offsets are normal with standard deviation ``offset_scale`` pixels; the mask is the sigmoid
    of a normal sample, as a DCNv2 layer produces.
    """
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    n, k = case.ndim, case.kernel_points
    if case.transposed:
        w_shape = (case.in_channels, case.out_channels // case.groups, *case.kernel)
        fan_in = case.in_channels // case.groups * k
    else:
        w_shape = (case.out_channels, case.in_channels // case.groups, *case.kernel)
        fan_in = w_shape[1] * k
    tensors: Tensors = {
        "input": torch.randn(case.batch, case.in_channels, *case.size, generator=gen),
        "weight": torch.randn(w_shape, generator=gen) / math.sqrt(fan_in),
        "offset": None,
        "mask": None,
        "bias": torch.randn(case.out_channels, generator=gen) if bias else None,
    }
    if case.offset_groups:
        shape = (case.batch, case.offset_groups * n * k, *case.grid)
        tensors["offset"] = torch.randn(shape, generator=gen) * offset_scale
    if case.mask_groups:
        shape = (case.batch, case.mask_groups * k, *case.grid)
        tensors["mask"] = torch.randn(shape, generator=gen).sigmoid()
    return {name: None if t is None else t.to(device=device, dtype=dtype) for name, t in tensors.items()}


# --------------------------------------------------------------------------------------------
# Implementations


class Unsupported(Exception):
    """Raised by an implementation for a case it does not support (shown as n/a, not an error)."""


@dataclass
class Impl:
    """An implementation under test.

    ``run(case, tensors)`` returns the output; ``grads`` names the tensors that require grad in
    the forward+backward measurement (those that are present). ``label(case)`` gives the name
    shown in the table.
    """

    name: str
    run: Callable[[Case, Tensors], Tensor]
    grads: Tuple[str, ...] = ("input", "weight", "offset", "mask", "bias")
    label: Optional[Callable[[Case], str]] = None

    def label_for(self, case: Case) -> str:
        return self.label(case) if self.label else self.name


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise Unsupported(reason)


def _run_dcn_plugin(case: Case, t: Tensors) -> Tensor:
    ops = dcn_plugin.ops
    if case.transposed:
        fn = getattr(ops, f"deform_conv_transpose{case.ndim}d")
        return fn(t["input"], t["weight"], t["offset"], t["mask"], t["bias"], case.stride, case.padding,
                  case.output_padding, case.dilation, case.groups)
    fn = getattr(ops, f"deform_conv{case.ndim}d")
    return fn(t["input"], t["weight"], t["offset"], t["mask"], t["bias"], case.stride, case.padding,
              case.dilation, case.groups)


def _run_torch_conv(case: Case, t: Tensors) -> Tensor:
    if case.transposed:
        fn = getattr(F, f"conv_transpose{case.ndim}d")
        return fn(t["input"], t["weight"], t["bias"], case.stride, case.padding, case.output_padding,
                  case.groups, case.dilation)
    fn = getattr(F, f"conv{case.ndim}d")
    return fn(t["input"], t["weight"], t["bias"], case.stride, case.padding, case.dilation, case.groups)


def _torch_conv_label(case: Case) -> str:
    return f"F.conv_transpose{case.ndim}d" if case.transposed else f"F.conv{case.ndim}d"


def _reference_impl() -> Impl:
    """``tests/reference.py``, called by keyword so that its argument order does not matter."""
    tests_dir = str(REPO_ROOT / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import reference  # noqa: PLC0415 - only importable once tests/ is on the path

    forward = reference.deform_conv_reference
    transpose = getattr(reference, "deform_conv_transpose_reference", None)

    def call(fn: Callable[..., Tensor], case: Case, t: Tensors, **extra: Any) -> Tensor:
        kwargs = dict(offset=t["offset"], mask=t["mask"], bias=t["bias"], stride=case.stride,
                      padding=case.padding, dilation=case.dilation, groups=case.groups, **extra)
        accepted = inspect.signature(fn).parameters
        return fn(t["input"], t["weight"], **{k: v for k, v in kwargs.items() if k in accepted})

    def run(case: Case, t: Tensors) -> Tensor:
        if case.transposed:
            _require(transpose is not None, "tests/reference.py has no deform_conv_transpose_reference")
            return call(transpose, case, t, output_padding=case.output_padding)
        return call(forward, case, t)

    return Impl("reference", run)


def _torchvision_impl() -> Impl:
    from torchvision.ops import deform_conv2d  # noqa: PLC0415 - optional peer

    def run(case: Case, t: Tensors) -> Tensor:
        _require(case.ndim == 2 and not case.transposed, "torchvision has only 2d forward deformable conv")
        _require(t["offset"] is not None, "torchvision needs an offset")
        # torchvision's order: input, offset, weight, bias, stride, padding, dilation, mask.
        return deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], stride=case.stride,
                             padding=case.padding, dilation=case.dilation, mask=t["mask"])

    return Impl("torchvision", run)


def _mmcv_impl() -> Impl:
    from mmcv.ops import deform_conv2d, modulated_deform_conv2d  # noqa: PLC0415 - optional peer

    def run(case: Case, t: Tensors) -> Tensor:
        _require(case.ndim == 2 and not case.transposed, "mmcv has only 2d forward deformable conv")
        _require(t["offset"] is not None, "mmcv needs an offset")
        k = case.kernel_points
        deform_groups = t["offset"].shape[1] // (2 * k)
        if t["mask"] is not None:
            _require(t["mask"].shape[1] // k == deform_groups,
                     "mmcv needs as many mask groups as offset groups")
            # autograd Functions: positional arguments only.
            return modulated_deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], t["bias"],
                                           case.stride, case.padding, case.dilation, case.groups,
                                           deform_groups)
        _require(t["bias"] is None, "mmcv's deform_conv2d has no bias")
        return deform_conv2d(t["input"], t["offset"], t["weight"], case.stride, case.padding,
                             case.dilation, case.groups, deform_groups)

    return Impl("mmcv", run)


def _tvdcn_impl() -> Impl:
    import tvdcn.ops  # noqa: PLC0415 - optional peer

    def run(case: Case, t: Tensors) -> Tensor:
        name = f"deform_conv_transpose{case.ndim}d" if case.transposed else f"deform_conv{case.ndim}d"
        fn = getattr(tvdcn.ops, name, None)
        _require(fn is not None, f"tvdcn.ops has no {name}")
        kwargs = dict(offset=t["offset"], mask=t["mask"], bias=t["bias"], stride=case.stride,
                      padding=case.padding, dilation=case.dilation, groups=case.groups)
        if case.transposed:
            kwargs["output_padding"] = case.output_padding
        return fn(t["input"], t["weight"], **kwargs)

    return Impl("tvdcn", run)


def _short_error(exc: BaseException, limit: int = 160) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_implementations(with_reference: bool) -> Tuple[List[Impl], List[str]]:
    """The implementations that import, and a note for each one that does not."""
    impls = [
        Impl("dcn_plugin", _run_dcn_plugin),
        Impl("torch_conv", _run_torch_conv, grads=("input", "weight", "bias"), label=_torch_conv_label),
    ]
    notes = []
    if not dcn_plugin.ops.has_ops():
        notes.append("dcn_plugin: compiled ops not loaded; rebuild with "
                     "`pip install --no-build-isolation -e .`")
    loaders = [("torchvision", _torchvision_impl), ("mmcv", _mmcv_impl), ("tvdcn", _tvdcn_impl)]
    if with_reference:
        loaders.insert(0, ("reference", _reference_impl))
    for name, loader in loaders:
        try:
            impls.append(loader())
        except Exception as exc:  # a peer that does not import is simply not benchmarked
            notes.append(f"{name}: not benchmarked ({_short_error(exc)})")
    return impls, notes


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """One measurement: median milliseconds over ``repeats``, or the reason there is none."""

    ms: Optional[float] = None
    repeats: int = 0
    peak_mib: Optional[float] = None
    error: Optional[str] = None
    skipped: bool = False


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    autocast: bool
    warmup: int
    repeats: int
    max_repeats: int
    min_time: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed(step: Callable[[], None], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def measure(step: Callable[[], None], s: Settings) -> Timing:
    """Median time of ``step`` after warm-up, with adaptively many repeats.

    The repeat count is at least ``s.repeats`` and large enough to take about ``s.min_time``
    seconds (capped at ``s.max_repeats``), judged from the last warm-up call.
    """
    device = s.device
    _clear_memory(device)
    try:
        # Warm up (at least one call, which also gives the time estimate); calls that already
        # take longer than min_time need no more warming up.
        estimate = _timed(step, device)
        for _ in range(s.warmup - 1):
            if estimate > s.min_time:
                break
            estimate = min(estimate, _timed(step, device))
        repeats = max(s.repeats, min(s.max_repeats, math.ceil(s.min_time / max(estimate, 1e-6))))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        times = [_timed(step, device) for _ in range(repeats)]
    except Unsupported as exc:
        return Timing(error=str(exc))
    except Exception as exc:  # an implementation that fails on a case is reported, not fatal
        _clear_memory(device)
        return Timing(error=_short_error(exc))
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return Timing(ms=1e3 * statistics.median(times), repeats=repeats, peak_mib=peak)


def _forward_step(impl: Impl, case: Case, tensors: Tensors, s: Settings) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad(), torch.autocast(s.device.type, dtype=s.dtype, enabled=s.autocast):
            impl.run(case, tensors)

    return step


def _backward_step(impl: Impl, case: Case, tensors: Tensors, s: Settings) -> Callable[[], None]:
    """Forward (under autocast, if asked) then backward with a fixed random output gradient."""
    leaves = {name: None if t is None else t.detach().requires_grad_(name in impl.grads)
              for name, t in tensors.items()}
    grad_output: List[Tensor] = []

    def step() -> None:
        for t in leaves.values():
            if t is not None:
                t.grad = None
        with torch.autocast(s.device.type, dtype=s.dtype, enabled=s.autocast):
            out = impl.run(case, leaves)
        if not grad_output:
            gen = torch.Generator().manual_seed(0)
            grad_output.append(torch.randn(out.shape, generator=gen).to(out.device, out.dtype))
        out.backward(grad_output[0])

    return step


@dataclass
class Result:
    """Forward and forward+backward timings of one implementation on one case."""

    case: str
    shape: str
    impl: str
    label: str
    fwd: Timing
    fwd_bwd: Timing
    fwd_vs_conv: Optional[float] = None
    fwd_bwd_vs_conv: Optional[float] = None


def run_case(case: Case, impls: Sequence[Impl], s: Settings, offset_scale: float, bias: bool,
             reference_limit: Optional[int]) -> List[Result]:
    """Times every implementation on ``case``; ratios are to plain convolution's times."""
    tensor_dtype = torch.float32 if s.autocast else s.dtype
    tensors = make_inputs(case, s.device, tensor_dtype, offset_scale, bias)
    results = []
    for impl in impls:
        too_big = reference_limit is not None and case.sampled_elements > reference_limit
        if impl.name == "reference" and too_big:
            reason = (f"reference skipped on cases with more than {reference_limit:,} sampled values "
                      "(use --with-reference to run it everywhere)")
            skip = Timing(error=reason, skipped=True)
            results.append(Result(case.name, case.describe(), impl.name, impl.label_for(case), skip, skip))
            continue
        fwd = measure(_forward_step(impl, case, tensors, s), s)
        if fwd.error is not None:
            fwd_bwd = Timing(error=fwd.error)  # no point in trying backward
        else:
            fwd_bwd = measure(_backward_step(impl, case, tensors, s), s)
        results.append(Result(case.name, case.describe(), impl.name, impl.label_for(case), fwd, fwd_bwd))
    conv = next((r for r in results if r.impl == "torch_conv"), None)
    for r in results:
        if conv is not None:
            r.fwd_vs_conv = _ratio(r.fwd.ms, conv.fwd.ms)
            r.fwd_bwd_vs_conv = _ratio(r.fwd_bwd.ms, conv.fwd_bwd.ms)
    del tensors
    _clear_memory(s.device)
    return results


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------------------------
# Reporting


def environment(s: Settings, threads: int) -> Dict[str, Any]:
    """Where and with what the numbers were taken."""
    if s.device.type == "cuda":
        device_name = torch.cuda.get_device_name(s.device)
    else:
        device_name = _cpu_model()
    return {
        "device": f"{s.device.type}: {device_name}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "dcn_plugin": dcn_plugin.__version__,
        "triton": _triton_version(),
        "threads": threads,
        "dtype": str(s.dtype).replace("torch.", "") + (" (autocast, float32 tensors)" if s.autocast else ""),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _triton_version() -> str:
    """The installed triton's version (dcn_plugin's CUDA kernels are Triton kernels), or why none."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Footnotes:
    """Numbers the distinct n/a reasons, in order of first appearance."""

    def __init__(self) -> None:
        self.reasons: List[str] = []

    def mark(self, reason: str) -> str:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"[{self.reasons.index(reason) + 1}]"


def build_table(results: Sequence[Result], show_memory: bool) -> Tuple[List[str], List[List[str]], List[str]]:
    """Header, rows and footnotes; the case and shape are shown on the first row of each case."""
    header = ["case", "shape", "impl", "fwd ms", "fwd+bwd ms", "fwd / conv", "fwd+bwd / conv"]
    if show_memory:
        header.append("peak MiB (f+b)")
    notes = Footnotes()

    def time_cell(t: Timing) -> str:
        if t.ms is not None:
            return f"{t.ms:.3f}" if t.ms < 1 else f"{t.ms:.2f}" if t.ms < 100 else f"{t.ms:.1f}"
        return ("skipped " if t.skipped else "n/a ") + notes.mark(t.error or "unknown")

    def ratio_cell(r: Optional[float]) -> str:
        return "-" if r is None else f"{r:.2f}x"

    rows, previous = [], None
    for r in results:
        first = r.case != previous
        previous = r.case
        row = [r.case if first else "", r.shape if first else "", r.label, time_cell(r.fwd),
               time_cell(r.fwd_bwd), ratio_cell(r.fwd_vs_conv), ratio_cell(r.fwd_bwd_vs_conv)]
        if show_memory:
            peak = r.fwd_bwd.peak_mib
            row.append("-" if peak is None else f"{peak:.1f}")
        rows.append(row)
    footnotes = [f"[{i + 1}] {reason}" for i, reason in enumerate(notes.reasons)]
    return header, rows, footnotes


_NUMERIC_COLUMNS = {"fwd ms", "fwd+bwd ms", "fwd / conv", "fwd+bwd / conv", "peak MiB (f+b)"}


def format_text(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in _NUMERIC_COLUMNS else c.ljust(w)
                         for c, w, h in zip(cells, widths, header)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def format_markdown(header: List[str], rows: List[List[str]]) -> str:
    align = ["---:" if h in _NUMERIC_COLUMNS else ":---" for h in header]
    esc = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: Path, env: Dict[str, Any], settings_note: str, table: str, footnotes: List[str],
                   notes: List[str]) -> None:
    lines = ["# dcn_plugin benchmark", ""]
    lines += [f"- **{key}**: {value}" for key, value in env.items()]
    lines += [f"- **measurement**: {settings_note}", "", table, ""]
    lines += [f"{note}  " for note in footnotes]
    if notes:
        lines += [""] * bool(footnotes) + [f"- {note}" for note in notes]
    path.write_text("\n".join(lines).rstrip() + "\n")


def write_json(path: Path, env: Dict[str, Any], settings: Dict[str, Any], results: Sequence[Result],
               notes: List[str]) -> None:
    payload = {"environment": env, "settings": settings, "notes": notes,
               "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Command line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--autocast", action="store_true",
                        help="float32 tensors, forward under torch.autocast(dtype=--dtype), as in training")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names or globs (default: the gpu-* cases with --device "
                             "cuda, all others on the CPU; see --list)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per measurement (default 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="minimum timed calls per measurement (default 3)")
    parser.add_argument("--max-repeats", type=int, default=1000,
                        help="maximum timed calls per measurement (default 1000)")
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="aim for at least this many seconds of timed calls per measurement (default 1)")
    parser.add_argument("--offset-scale", type=float, default=1.5,
                        help="standard deviation of the random offsets, in pixels (default 1.5)")
    parser.add_argument("--bias", action="store_true", help="add a bias (default: none, as in ResNet)")
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument("--with-reference", action="store_true",
                     help="time tests/reference.py on every case (slow)")
    ref.add_argument("--no-reference", action="store_true", help="never time tests/reference.py")
    parser.add_argument("--reference-limit", type=int, default=3_000_000,
                        help="without --with-reference, time the reference only on cases with at most this "
                             "many sampled values, B*C*K*grid (default 3,000,000)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write a Markdown report here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.autocast and args.dtype not in ("float16", "bfloat16"):
        parser.error("--autocast needs --dtype float16 or bfloat16")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.repeats < 1 or args.warmup < 0 or args.max_repeats < args.repeats:
        parser.error("need --repeats >= 1, --warmup >= 0 and --max-repeats >= --repeats")
    return args


def select_cases(spec: Optional[str], device: str = "cpu") -> List[Case]:
    """The cases named by ``spec`` (names or globs, e.g. ``gpu-*``); by default the GPU cases on
    CUDA and the others on the CPU."""
    if not spec:
        return list(GPU_CASES if device == "cuda" else CASES)
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in ALL_CASES)]
    if unknown:
        known = ", ".join(c.name for c in ALL_CASES)
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; known: {known}")
    return [c for c in ALL_CASES if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        for case in ALL_CASES:
            print(f"{case.name:10s} {case.describe()}")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = select_cases(args.cases, args.device)
    settings = Settings(device=torch.device(args.device), dtype=DTYPES[args.dtype], autocast=args.autocast,
                        warmup=args.warmup, repeats=args.repeats, max_repeats=args.max_repeats,
                        min_time=args.min_time)
    impls, notes = load_implementations(with_reference=not args.no_reference)
    reference_limit = None if args.with_reference else args.reference_limit
    env = environment(settings, torch.get_num_threads())
    print("  ".join(f"{key}: {value}" for key, value in env.items()), flush=True)

    results: List[Result] = []
    for case in cases:
        start = time.perf_counter()
        results += run_case(case, impls, settings, args.offset_scale, args.bias, reference_limit)
        print(f"  {case.name} ({case.describe()}) done in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)

    header, rows, footnotes = build_table(results, show_memory=settings.device.type == "cuda")
    settings_note = (f"median of >= {args.repeats} calls (>= {args.min_time:g} s, "
                     f"<= {args.max_repeats} calls) "
                     f"after {args.warmup} warm-up; backward with a random output gradient, input, weight, "
                     f"offset and mask requiring grad; offsets ~ N(0, {args.offset_scale:g}^2) px, "
                     "mask = sigmoid(N(0, 1)); ratios are to F.conv* of the same shape without offsets")
    if settings.device.type == "cuda":
        settings_note += "; peak MiB = max_memory_allocated above the inputs during forward+backward"
    print()
    print(format_text(header, rows))
    for line in footnotes + notes:
        print(line)
    if args.markdown:
        write_markdown(args.markdown, env, settings_note, format_markdown(header, rows), footnotes, notes)
    if args.json:
        json_settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_json(args.json, env, json_settings, results, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
