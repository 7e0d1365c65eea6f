"""``dcn_plugin.ops.shapes`` against torch's own convolutions, and ``tools/benchmark.py`` end to end
on its smallest case (a smoke test of the program; it asserts nothing about speed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from extras import require

from dcn_plugin.ops.shapes import DeformConvShape, accumulate_dtype, conv_output_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("transposed", [False, True])
def test_output_size_is_torch_convolutions(transposed):
    grid = itertools.product((1, 5, 8), (1, 2, 3), (1, 2, 3), (0, 1, 2), (1, 2))
    for size, kernel, stride, padding, dilation in grid:
        x = torch.zeros(1, 1, size)
        w = torch.zeros(1, 1, kernel)
        for output_padding in range(max(stride, dilation)) if transposed else (0,):
            try:
                if transposed:
                    y = F.conv_transpose1d(x, w, None, stride, padding, output_padding, 1, dilation)
                else:
                    y = F.conv1d(x, w, None, stride, padding, dilation)
            except RuntimeError:  # torch refuses: a non-positive size
                continue
            expected = y.shape[-1]
            got = conv_output_size(size, kernel, stride, padding, dilation, transposed, output_padding)
            assert got == expected, (size, kernel, stride, padding, dilation, output_padding)


def test_shape_record():
    case = DeformConvShape.build(2, batch=3, in_channels=6, out_channels=4, in_size=(7, 9), kernel=(3, 2),
                                 stride=2, groups=2, offset_groups=2, mask_groups=3)
    assert case.n == 2 and case.kernel_points == 6 and case.out_size == (4, 5)
    assert case.weight_shape == (4, 3, 3, 2) and case.output_shape == (3, 4, 4, 5)
    assert case.offset_shape == (3, 2 * 2 * 6, 4, 5) and case.mask_shape == (3, 3 * 6, 4, 5)
    # convolution: the input is sampled (the image), offset and mask live on the output grid
    assert case.image_shape == (3, 6, 7, 9) and case.image_points == 63
    assert case.grid_channels == 4 and case.grid_size == (4, 5) and case.grid_points == 20
    assert (case.channels_per_offset_group, case.channels_per_mask_group) == (3, 2)
    assert case.sample_groups == 6 and case.channels_per_sample_group == 1  # lcm(2, 3)
    assert case.is_valid() and not DeformConvShape.build(2, in_channels=6, offset_groups=4).is_valid()
    transposed = DeformConvShape.build(1, in_channels=2, out_channels=6, in_size=4, stride=2, transposed=True,
                                       offset_groups=0, mask_groups=2)
    assert transposed.out_size == (7,) and transposed.weight_shape == (2, 6, 3)
    # transposed: the output is sampled, offset and mask live on the input grid
    assert transposed.image_shape == (2, 6, 7) and transposed.grid_size == (4,)
    assert transposed.grid_channels == 2 and transposed.channels_per_offset_group == 6
    assert transposed.sample_groups == 2 and transposed.channels_per_sample_group == 3
    assert transposed.describe() == "T 2x2x4->6x7 k3 s2 no-offset mg2"


def test_accumulate_dtype():
    assert accumulate_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert accumulate_dtype(dtype) == torch.float32


def _shape_cases():
    """The tests' kinds of case: 1d/2d/3d, plain and transposed, groups, offset and mask groups
    (absent ones too), strides, paddings, dilations and output paddings that differ per dim."""
    geometries = [
        dict(),
        dict(stride=2, padding=0, output_padding=1, groups=2, offset_groups=2, mask_groups=1),
        dict(stride=(2, 1, 3), padding=(0, 1, 2), dilation=(1, 2, 1), output_padding=(1, 0, 2),
             kernel=(3, 2, 1), offset_groups=0, mask_groups=2),
        dict(in_channels=6, out_channels=6, groups=3, offset_groups=2, mask_groups=3, kernel=(2, 3, 2)),
        dict(in_channels=4, out_channels=8, groups=4, offset_groups=4, mask_groups=0, stride=3, padding=2,
             dilation=2, output_padding=2),
    ]
    cases = []
    for n, transposed, geometry in itertools.product((1, 2, 3), (False, True), geometries):
        kwargs = {k: v[:n] if isinstance(v, tuple) else v for k, v in geometry.items()}
        if not transposed:
            kwargs.pop("output_padding", None)
        case = DeformConvShape.build(n, transposed=transposed, in_size=(9, 7, 5)[:n], **kwargs)
        assert case.is_valid(), case
        cases.append(case)
    return cases


def _op_tensors(case: DeformConvShape, device: str = "cpu"):
    def zeros(shape):
        return torch.zeros(shape, device=device)

    offset = zeros(case.offset_shape) if case.offset_groups else None
    mask = zeros(case.mask_shape) if case.mask_groups else None
    return zeros(case.input_shape), zeros(case.weight_shape), offset, mask


def _op_output_shape(case: DeformConvShape, device: str = "cpu") -> tuple:
    input, weight, offset, mask = _op_tensors(case, device)
    out = torch.ops.dcn_plugin.deform_conv(input, weight, offset, mask, None, list(case.stride),
                                           list(case.padding), list(case.dilation), case.transposed,
                                           list(case.output_padding), case.groups)
    return tuple(out.shape)


def test_record_and_op_agree_on_shapes():
    """The record's output shape is the C++ op's (and the fake kernel's, which uses the record), and
    the record read back from the op's arguments is the case, over the tests' kinds of case and
    the benchmark's cases (those with an empty batch: the sizes without the work)."""
    benchmark = _benchmark_module()
    cases = _shape_cases() + [dataclasses.replace(case, batch=0) for case in
                              [*benchmark.CPU_CASES.values(), *benchmark.GPU_CASES.values()]]
    for case in cases:
        assert _op_output_shape(case) == case.output_shape, case.describe()
        assert _op_output_shape(case, "meta") == case.output_shape, case.describe()
        params = (case.stride, case.padding, case.dilation, case.transposed, case.output_padding, case.groups)
        assert DeformConvShape.of(*_op_tensors(case, "meta"), *params) == case, case.describe()


def test_record_refuses_dynamic_channel_counts():
    """At ONNX export, batch and spatial sizes may be symbolic, channel counts and kernel sizes not."""
    require("onnxscript")
    from onnxscript import ir

    def value(*dims):
        return ir.Value(name="v", shape=ir.Shape(list(dims)))

    batch, height = ir.SymbolicDim("batch"), ir.SymbolicDim("height")
    params = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    input, weight, offset = value(batch, 4, height, 8), value(6, 4, 3, 3), value(batch, 18, height, 8)
    shape = DeformConvShape.of(input, weight, offset, None, *params)
    assert shape.batch == batch and shape.in_size == (height, 8) and shape.grid_channels == 6
    assert shape.offset_groups == 1 and shape.mask_groups == 0 and shape.sample_groups == 1
    with pytest.raises(ValueError, match="weight has a dynamic size c along dim 1; channel counts and"):
        DeformConvShape.of(value(batch, 4, 8, 8), value(6, ir.SymbolicDim("c"), 3, 3), None, None, *params)


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "tools", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_and_reports(tmp_path):
    benchmark = _benchmark_module()
    out = tmp_path / "bench.json"
    assert benchmark.main(["--cases", "qs-256", "--min-time", "0", "--repeats", "1", "--json", str(out),
                           "--markdown", str(tmp_path / "bench.md"),
                           "--plot", str(tmp_path / "bench.png")]) == 0
    results = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert results["F.conv"]["fwd_bwd_vs_baseline"] == 1.0
    assert results["dcn_plugin"]["fwd"]["ms"] > 0 and results["dcn_plugin"]["fwd_bwd_vs_baseline"] > 0
    assert "| qs-256 | 16x256x4x4->256x4x4 k3x3 | dcn_plugin |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mask_groups", [2, 0], ids=["mask", "no-mask"])
def test_benchmark_onnxruntime_peer_computes_the_op(mask_groups):
    """The onnxruntime peer's one-node model is the op: same output as dcn_plugin (forward only)."""
    require("onnx", "onnxruntime")
    benchmark = _benchmark_module()
    case = DeformConvShape.build(2, batch=2, in_channels=8, out_channels=6, in_size=(7, 9), kernel=3,
                                 stride=2, dilation=(1, 2), padding=(1, 2), groups=2, offset_groups=2,
                                 mask_groups=mask_groups)
    tensors = benchmark.make_inputs("peer", case, "cpu", torch.float32)
    run = benchmark._onnxruntime()
    torch.testing.assert_close(run(case, tensors), benchmark._run_dcn_plugin(case, tensors), atol=1e-5,
                               rtol=1e-4)
    with pytest.raises(benchmark.Unsupported, match="no backward"):
        run(case, {k: None if t is None else t.requires_grad_() for k, t in tensors.items()})
