"""The deformable RoI pooling ops (``dcn_plugin::deform_roi_pool``, mmcv's; ``dcn_plugin::deform_psroi_pool``,
R-FCN's) against mmcv's published values and ``tests/roi_reference.py``: forward and gradients, float64
gradcheck, RoIs inside, partly and wholly outside the map, degenerate and empty sets of RoIs, half
types, bad input, opcheck, torch.compile, determinism, and the benchmark's RoI cases.

Each test runs on the CPU, and on CUDA (the Triton kernels) where there is a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
from roi_reference import (
    PSROI,
    ROI,
    ROI_CASES,
    RoiCase,
    make_roi_tensors,
    roi_forward_backward,
    run_roi_op,
    run_roi_reference,
)

from dcn_plugin import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# mmcv's tests/test_ops/test_deform_roi_pool.py: DeformRoIPoolPack((2, 2), C, spatial_scale=1,
# sampling_ratio=2) at initialisation (zero offsets), the input gradient for a gradient of ones.
MMCV_INPUTS = [
    ([[[[1., 2.], [3., 4.]]]], [[0., 0., 0., 1., 1.]]),
    ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [[0., 0., 0., 1., 1.]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
     [[0., 0., 0., 3., 3.]]),
]
MMCV_OUTPUTS = [
    ([[[[1, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 1.25], [1.5, 1.75]], [[4, 3.75], [3.5, 3.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.4296875, 0.4296875, 0.04296875], [0.4296875, 0.390625, 0.390625, 0.0390625],
        [0.4296875, 0.390625, 0.390625, 0.0390625], [0.04296875, 0.0390625, 0.0390625, 0.00390625]]]]),
]


def _mmcv_case(index: int, device: str, dtype: torch.dtype):
    x = torch.tensor(MMCV_INPUTS[index][0], dtype=dtype, device=device, requires_grad=True)
    rois = torch.tensor(MMCV_INPUTS[index][1], dtype=dtype, device=device)
    expected, expected_grad = (torch.tensor(t, dtype=torch.float64) for t in MMCV_OUTPUTS[index])
    return x, rois, expected, expected_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("index", range(len(MMCV_INPUTS)))
def test_mmcv_published_values(device, index, dtype):
    """mmcv's DeformRoIPoolPack test, exactly (mmcv asserts to rtol 1e-3; these agree to rounding)."""
    x, rois, expected, expected_grad = _mmcv_case(index, device, dtype)
    pool = ops.DeformRoIPoolPack((2, 2), x.shape[1], spatial_scale=1.0, sampling_ratio=2).to(device, dtype)
    out = pool(x, rois)
    out.backward(torch.ones_like(out))
    tolerance = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float16 else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double().cpu(), expected, **tolerance)
    torch.testing.assert_close(x.grad.double().cpu(), expected_grad, **tolerance)


@pytest.mark.parametrize("index", range(len(MMCV_INPUTS)))
def test_mmcv_published_values_modulated(device, index):
    """mmcv publishes no values for ModulatedDeformRoIPoolPack; at initialisation its mask is
    sigmoid(0) = 1/2 of DeformRoIPoolPack's (mmcv's mask_fc ends in a zeroed Linear and a Sigmoid),
    so it gives half the published values."""
    x, rois, expected, expected_grad = _mmcv_case(index, device, torch.float64)
    pool = ops.ModulatedDeformRoIPoolPack((2, 2), x.shape[1], spatial_scale=1.0, sampling_ratio=2)
    out = pool.to(device, torch.float64)(x, rois)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out.cpu(), expected / 2)
    torch.testing.assert_close(x.grad.cpu(), expected_grad / 2)


# ------------------------------------------------------------------------------------------------
# Against the reference

CASES = ROI_CASES


def assert_matches_reference(case: RoiCase, tensors, float64: bool = True):
    out, grads = roi_forward_backward(run_roi_op, case, tensors)
    cpu64 = {k: None if t is None else t.detach().cpu().double() for k, t in tensors.items()}
    expected, expected_grads = roi_forward_backward(run_roi_reference, case, cpu64)
    tolerance = dict(atol=1e-10, rtol=1e-8) if float64 else dict(atol=2e-5, rtol=2e-5)
    assert out.shape == expected.shape and out.dtype == tensors["input"].dtype
    torch.testing.assert_close(out.cpu().double(), expected, **tolerance)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert grad.shape == tensors[name].shape and grad.dtype == tensors[name].dtype, name
        torch.testing.assert_close(grad.cpu().double(), expected_grads[name], **tolerance,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(device, name):
    """Forward, input and offset gradients on RoIs inside the map, partly and wholly outside, of
    zero width or height, inverted and larger than the map, in float64."""
    assert_matches_reference(CASES[name], make_roi_tensors(CASES[name], device=device))


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_float32(device, kind):
    case = CASES[kind].replace(channels=40, size=(12, 10))
    tensors = make_roi_tensors(case, rois=12, dtype=torch.float32, device=device, seed=3)
    assert_matches_reference(case, tensors, float64=False)


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_gradcheck(device, kind):
    """float64 gradcheck of the input and offset gradients (random offsets keep the samples off the
    points where interpolation is not differentiable)."""
    case = CASES[kind].replace(batch=1, channels=2, size=(5, 6))
    tensors = make_roi_tensors(case, rois=4, device=device, seed=5)
    rois = tensors["rois"]

    def fn(input, offset):
        return run_roi_op(case, {"input": input, "rois": rois, "offset": offset})

    inputs = (tensors["input"].requires_grad_(), tensors["offset"].requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_no_rois(device, kind):
    case = CASES[kind]
    tensors = make_roi_tensors(case, rois=0, device=device)
    out, grads = roi_forward_backward(run_roi_op, case, tensors)
    assert out.shape == (0, case.channels, *case.pooled)
    assert torch.equal(grads["input"], torch.zeros_like(tensors["input"]))
    assert grads["offset"].shape == tensors["offset"].shape == case.offset_shape(0)


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_rois_wholly_outside_pool_zero(device, kind):
    """RoIs far off the map read nothing: zero output and gradients (mmcv: samples off the map are
    zeros; R-FCN: no valid sample, output 0)."""
    case = CASES[kind]
    tensors = make_roi_tensors(case, rois=3, device=device)
    tensors["rois"][:, 1:] = torch.tensor([[-90.0, -90.0, -40.0, -40.0], [100.0, 5.0, 130.0, 12.0],
                                           [3.0, 200.0, 9.0, 260.0]], dtype=torch.float64)
    out, grads = roi_forward_backward(run_roi_op, case, tensors)
    assert torch.equal(out, torch.zeros_like(out))
    assert not grads["input"].any() and not grads["offset"].any()


def test_degenerate_rois_follow_mmcv(device):
    """A zero-size RoI with adaptive sampling has no samples and pools to 0 (mmcv's count is
    max(grid, 1)); with a fixed sampling ratio every sample is the same point."""
    x = torch.arange(20.0, dtype=torch.float64, device=device).view(1, 1, 4, 5)
    point = torch.tensor([[0, 2.5, 1.5, 2.5, 1.5]], dtype=torch.float64, device=device)
    assert not ops.deform_roi_pool(x, point, None, 2, 1.0, 0).any()
    expected = x[0, 0, 1, 2]  # (2.5, 1.5) - 0.5 = pixel (x=2, y=1)
    torch.testing.assert_close(ops.deform_roi_pool(x, point, None, 2, 1.0, 3),
                               expected.expand(1, 1, 2, 2))


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_non_contiguous_and_channels_last(device, kind):
    case = CASES[kind]
    tensors = make_roi_tensors(case, device=device)
    expected = run_roi_op(case, tensors)
    wide = torch.zeros(*tensors["offset"].shape[:-1], 2 * tensors["offset"].shape[-1], dtype=torch.float64,
                       device=device)
    wide[..., ::2] = tensors["offset"]
    rois_t = tensors["rois"].t().contiguous().t()
    other = {"input": tensors["input"].to(memory_format=torch.channels_last), "rois": rois_t,
             "offset": wide[..., ::2]}
    torch.testing.assert_close(run_roi_op(case, other), expected)


@pytest.mark.parametrize("rois_dtype", [torch.float32, torch.float16])
def test_rois_of_another_dtype(device, rois_dtype):
    """RoIs in any floating dtype (boxes stay float32 under autocast) are read as the compute dtype."""
    case = CASES["roi"]
    tensors = make_roi_tensors(case, device=device, dtype=torch.float32)
    tensors["rois"] = tensors["rois"].to(rois_dtype)
    expected = run_roi_op(case, {**tensors, "rois": tensors["rois"].float()})
    torch.testing.assert_close(run_roi_op(case, tensors), expected)


# ------------------------------------------------------------------------------------------------
# Half types: at most twice the error of the same computation by plain PyTorch in that dtype


def _relative_error(actual, expected) -> float:
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_half_types_at_most_twice_plain_torch_error(device, kind, dtype):
    assert_half_type_like_plain_torch(CASES[kind].replace(channels=16, size=(12, 14)), dtype, device, rois=10)


def assert_half_type_like_plain_torch(case: RoiCase, dtype: torch.dtype, device: str, rois: int) -> None:
    """Output, input and offset gradients in ``dtype`` against float64 on the same (rounded) values
    are at most twice as far off as ``tests/roi_reference.py`` run by plain PyTorch with its values
    and sums in ``dtype`` (positions in float32, as any RoIAlign computes them)."""
    low = make_roi_tensors(case, rois=rois, dtype=dtype, device=device, seed=7)
    exact = {k: None if t is None else t.cpu().double() for k, t in low.items()}
    plain = {"input": low["input"].cpu(), "rois": low["rois"].cpu().float(),
             "offset": low["offset"].cpu().float()}
    out, grads = roi_forward_backward(run_roi_op, case, low)
    expected, expected_grads = roi_forward_backward(run_roi_reference, case, exact)
    baseline, baseline_grads = roi_forward_backward(run_roi_reference, case, plain)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    floor = torch.finfo(dtype).eps / 8
    pairs = {"output": (out, baseline, expected)}
    pairs.update({name: (grads[name], baseline_grads[name], expected_grads[name]) for name in grads})
    for name, (actual, plain_result, oracle) in pairs.items():
        error, plain_error = _relative_error(actual, oracle), _relative_error(plain_result, oracle)
        assert error <= 2 * max(plain_error, floor), f"{name}: {error:.3g} vs plain PyTorch {plain_error:.3g}"


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument

BAD_ROI_INPUT = {
    "rois-4-columns": (dict(rois=lambda t: t["rois"][:, :4]), r"rois must have shape \(R, 5\)"),
    "rois-1d": (dict(rois=lambda t: t["rois"][0]), r"rois must have shape \(R, 5\)"),
    "rois-int": (dict(rois=lambda t: t["rois"].long()), "rois must be a floating-point tensor"),
    "batch-index-too-large": (dict(rois=lambda t: _with_index(t["rois"], 2.0)),
                              r"rois\[1, 0\] = 2 is not a batch index of the input.*\[0, 2\)"),
    "batch-index-negative": (dict(rois=lambda t: _with_index(t["rois"], -1.0)),
                             r"rois\[1, 0\] = -1 is not a batch"),
    "batch-index-fractional": (dict(rois=lambda t: _with_index(t["rois"], 0.5)),
                               r"rois\[1, 0\] = 0.5 is not a"),
    "offset-shape": (dict(offset=lambda t: t["offset"][:, :, :1]),
                     r"offset must have shape \(R=9, 2, 3, 2\)"),
    "offset-rois": (dict(offset=lambda t: t["offset"][:4]), r"offset must have shape \(R=9, 2, 3, 2\)"),
    "offset-dtype": (dict(offset=lambda t: t["offset"].float()),
                     "offset has dtype Float but input has dtype Double"),
    "input-3d": (dict(input=lambda t: t["input"][0]),
                 r"input must have shape \(batch, channels, height, width\)"),
    "input-int": (dict(input=lambda t: t["input"].long()), "input must be a floating-point tensor"),
}


def _with_index(rois, value):
    rois = rois.clone()
    rois[1, 0] = value
    return rois


BAD_ROI_PARAMS = {
    "output-size-zero": (dict(output_size=[0, 2]), r"output_size\[0\] \(height\) must be positive, got 0"),
    "output-size-one-value": (dict(output_size=[3]), "output_size must have 2 values"),
    "spatial-scale-zero": (dict(spatial_scale=0.0), "spatial_scale must be positive, got 0"),
    "spatial-scale-negative": (dict(spatial_scale=-1.0), "spatial_scale must be positive"),
    "sampling-ratio-negative": (dict(sampling_ratio=-1), "sampling_ratio must be non-negative"),
    "gamma-nan": (dict(gamma=float("nan")), "gamma must be finite"),
}

BAD_PSROI = {
    "channels-not-divisible": (dict(input=lambda t: t["input"][:, :-1]),
                               r"input must have output_dim \* group_size\^2 = 3 \* 2\^2 = 12 channels, "
                               r"got 11"),
    "classes-do-not-divide": (dict(offset=lambda t: torch.cat([t["offset"]] * 2, 1)),
                              "offset has 2 classes .* which does not divide output_dim = 3"),
    "offset-odd-channels": (dict(offset=lambda t: t["offset"][:, :1]),
                            r"offset must have shape \(R, 2 \* classes"),
    "offset-parts": (dict(offset=lambda t: t["offset"][..., :1]),
                     r"offset must have shape \(R=9, 2 \* classes, part_size=2, part_size=2\)"),
    "group-size-zero": (dict(group_size=0), "group_size must be positive, got 0"),
    "pooled-size-zero": (dict(pooled_size=0), "pooled_size must be positive"),
    "part-size-negative": (dict(part_size=-2), "part_size must be positive"),
    "sample-per-part-zero": (dict(sample_per_part=0), "sample_per_part must be positive"),
    "output-dim-zero": (dict(output_dim=0), "output_dim must be positive"),
    "spatial-scale-zero": (dict(spatial_scale=0.0), "spatial_scale must be positive"),
    "batch-index": (dict(rois=lambda t: _with_index(t["rois"], 5.0)),
                    r"rois\[1, 0\] = 5 is not a batch index"),
}


def _raw_call(case: RoiCase, tensors, overrides):
    t = dict(tensors)
    names = ("output_size", "spatial_scale", "sampling_ratio", "gamma") if case.kind == "roi" else \
        ("spatial_scale", "output_dim", "group_size", "pooled_size", "part_size", "sample_per_part",
         "trans_std")
    params = dict(zip(names, case.params()))
    for key, value in overrides.items():
        if key in t:
            t[key] = value(tensors)
        else:
            params[key] = value
    return case.op(t["input"], t["rois"], t["offset"], *params.values())


@pytest.mark.parametrize("name", list(BAD_ROI_INPUT) + list(BAD_ROI_PARAMS))
def test_bad_input_deform_roi_pool(device, name):
    overrides, match = {**BAD_ROI_INPUT, **BAD_ROI_PARAMS}[name]
    with pytest.raises(RuntimeError, match="deform_roi_pool: " + match):
        _raw_call(ROI, make_roi_tensors(ROI, device=device), overrides)


@pytest.mark.parametrize("name", list(BAD_PSROI))
def test_bad_input_deform_psroi_pool(device, name):
    overrides, match = BAD_PSROI[name]
    with pytest.raises(RuntimeError, match="deform_psroi_pool: " + match):
        _raw_call(PSROI, make_roi_tensors(PSROI, device=device), overrides)


def test_bad_grad_output(device):
    tensors = make_roi_tensors(ROI, device=device)
    grad = torch.zeros(9, 3, 2, 2, dtype=torch.float64, device=device)
    match = (r"deform_roi_pool_backward: grad_output has shape \[9, 3, 2, 2\] but the output has shape "
             r"\[9, 3, 3, 2\]")
    with pytest.raises(RuntimeError, match=match):
        ROI.backward_op(grad, tensors["input"], tensors["rois"], tensors["offset"], *ROI.params(),
                        [True, True])


def test_mixed_devices(cuda_device):
    tensors = make_roi_tensors(ROI, device=cuda_device)
    with pytest.raises(RuntimeError, match="deform_roi_pool: rois is on cpu but input is on cuda"):
        ROI.op(tensors["input"], tensors["rois"].cpu(), tensors["offset"], *ROI.params())


def test_module_arguments():
    x = torch.randn(1, 4, 6, 6)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match=r"output_channels=3, H, W\), got \(1, 4, 6, 6\)"):
        ops.DeformRoIPoolPack(2, 3, 8)(x, rois)
    with pytest.raises(ValueError, match="offset is required unless no_trans=True"):
        ops.DeformablePSRoIPooling(1.0, 1, 2, 2)(x, rois)
    with pytest.raises(ValueError, match="output_size must be an int or a tuple of 2 ints"):
        ops.deform_roi_pool(x, rois, None, (2, 2, 2))


# ------------------------------------------------------------------------------------------------
# The op as PyTorch sees it


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("name", ["roi", "roi-no-offset", "psroi-classes", "psroi-no-offset"])
def test_opcheck(device, name, requires_grad):
    case = CASES[name].replace(batch=2, size=(4, 5))
    t = make_roi_tensors(case, rois=3, device=device)
    for key in ("input", "offset"):
        if t[key] is not None:
            t[key].requires_grad_(requires_grad)
    torch.library.opcheck(case.op.default, (t["input"], t["rois"], t["offset"], *case.params()))


@pytest.mark.parametrize("output_mask", [[True, True], [True, False], [False, True], [False, False]])
@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_backward_op_output_mask(device, kind, output_mask):
    """The backward op returns exactly the gradients asked for (others empty), each right; opcheck."""
    case = CASES[kind]
    t = make_roi_tensors(case, device=device)
    grad_output = torch.randn(9, case.channels, *case.pooled, dtype=torch.float64, device=device)
    args = (grad_output, t["input"], t["rois"], t["offset"], *case.params(), output_mask)
    result = case.backward_op(*args)
    leaves = {k: v.detach().cpu().requires_grad_(k != "rois") for k, v in t.items()}
    (run_roi_reference(case, leaves) * grad_output.cpu()).sum().backward()
    for (name, grad), wanted in zip((("input", result[0]), ("offset", result[1])), output_mask):
        if wanted:
            torch.testing.assert_close(grad.cpu(), leaves[name].grad, atol=1e-10, rtol=1e-8, msg=name)
        else:
            assert grad.shape == (0,), name
    torch.library.opcheck(case.backward_op.default, args)


@pytest.mark.parametrize("name", ["roi", "psroi", "roi-channel-blocks", "psroi-part-across-groups"])
def test_offset_gradient_alone_or_with_input_gradient(name):
    """The CPU backward adds the offset gradient in the input gradient's pass where no two tasks
    share an offset, and in a pass of its own otherwise: asked alone or with the input gradient, the
    offset gradient is bitwise the same."""
    case = CASES[name]
    t = make_roi_tensors(case, rois=12, dtype=torch.float32, seed=5)
    grad_output = torch.randn(12, case.channels, *case.pooled, generator=torch.Generator().manual_seed(1))
    args = (grad_output, t["input"], t["rois"], t["offset"], *case.params())
    both = case.backward_op(*args, [True, True])
    alone = case.backward_op(*args, [False, True])
    assert torch.equal(both[1], alone[1])
    assert torch.equal(both[0], case.backward_op(*args, [True, False])[0])


def test_compile_fullgraph(device):
    """A head that pools with both ops, compiled whole (inductor), forward and backward."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 12, device=device, requires_grad=True)
    rois = torch.tensor([[0, 2.0, 3.0, 15.0, 14.0], [1, 1.0, 0.0, 20.0, 9.0]], device=device)
    offset = torch.randn(2, 2, 3, 3, device=device, requires_grad=True)

    def head(x, rois, offset):
        a = ops.deform_roi_pool(x, rois, offset, 3, 0.5, 2)
        b = ops.deform_psroi_pool(x, rois, offset, 0.5, 2, 2, 3, 3, 2, 0.1)
        return (a.relu().sum((2, 3)) * b.sum()).sum()

    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True)
    results = []
    for fn in (compiled, head):
        x.grad = offset.grad = None
        loss = fn(x, rois, offset)
        loss.backward()
        results.append((loss.detach(), x.grad.clone(), offset.grad.clone()))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_autocast(device, kind):
    """Under autocast the ops run in the autocast dtype (input and offset cast, RoIs as they are),
    as the convolution does; gradients come back in float32."""
    case = CASES[kind]
    tensors = make_roi_tensors(case, dtype=torch.float32, device=device)
    for dtype in [torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]:
        # the oracle sees the values the op sees (R-FCN's count of valid samples jumps with them)
        rounded = {k: t if k == "rois" else t.to(dtype) for k, t in tensors.items()}
        expected = run_roi_reference(case, {k: t.double() for k, t in rounded.items()})
        leaves = {k: t.clone().requires_grad_(k != "rois") for k, t in tensors.items()}
        with torch.autocast(device, dtype=dtype):
            out = run_roi_op(case, leaves)
        assert out.dtype == dtype
        assert _relative_error(out, expected) < 8 * torch.finfo(dtype).eps
        out.float().sum().backward()
        assert leaves["input"].grad.dtype == leaves["offset"].grad.dtype == torch.float32


def test_pack_under_autocast(device):
    """DeformRoIPoolPack on float32 features in an autocast region: its offset head gives offsets in
    the autocast dtype, which the op accepts (it casts the input to match)."""
    pool = ops.ModulatedDeformRoIPoolPack(3, 8, 16, spatial_scale=0.5).to(device)
    x = torch.randn(2, 8, 10, 12, device=device)
    rois = torch.tensor([[0, 1.0, 2.0, 15.0, 14.0], [1, 3.0, 3.0, 9.0, 18.0]], device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = pool(x, rois)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), pool(x, rois), atol=0.02, rtol=0.02)


def test_double_backward_raises(device):
    t = make_roi_tensors(ROI, device=device)
    x = t["input"].requires_grad_()
    out = run_roi_op(ROI, t)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_deterministic_across_threads(kind):
    """The CPU kernels give bitwise the same output and gradients with 1 and 2 threads (no racing
    scatters; fixed summation order), many RoIs overlapping."""
    case = CASES[kind].replace(channels=36, size=(12, 12))
    tensors = make_roi_tensors(case, rois=40, dtype=torch.float32, seed=11)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(roi_forward_backward(run_roi_op, case, tensors))
    finally:
        torch.set_num_threads(threads)
    (out1, grads1), (out2, grads2) = results
    assert torch.equal(out1, out2)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


# ------------------------------------------------------------------------------------------------
# tools/benchmark.py's RoI cases


def test_benchmark_roi_cases(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "tools", "benchmark.py"))
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = benchmark
    spec.loader.exec_module(benchmark)
    out = tmp_path / "bench.json"
    assert benchmark.main(["--op", "roi", "--cases", "smoke-*", "--min-time", "0", "--repeats", "1",
                           "--json", str(out)]) == 0
    results = {(r["case"], r["impl"]): r for r in json.loads(out.read_text())["results"]}
    assert {case for case, _ in results} == {"smoke-roi", "smoke-psroi"}
    for (case, impl), r in results.items():
        assert r["fwd"]["ms"] > 0 and r["fwd_bwd"]["ms"] > 0, (case, impl)
