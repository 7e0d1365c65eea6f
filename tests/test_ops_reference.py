"""The op against the pure-PyTorch reference (forward and every gradient), and the reference
itself against ``F.conv*`` and its own adjoint identity."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import (
    Case,
    deform_conv_reference,
    deform_conv_transpose_reference,
    forward_backward,
    make_tensors,
    reference_conv,
    run_op,
    run_reference,
)

DIMS_TRANSPOSED = [(n, t) for n in (1, 2, 3) for t in (False, True)]
IDS = [f"{n}d{'-transposed' if t else ''}" for n, t in DIMS_TRANSPOSED]


def assert_close(actual, expected, dtype=torch.float64, name=""):
    tol = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-4, 1e-4)}[dtype]
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected.detach().cpu().double(), atol=tol[0], rtol=tol[1],
        msg=lambda m: f"{name}: {m}",
    )


def check_against_reference(case: Case, device: str, dtype=torch.float64, seed: int = 0, offset_scale=1.0):
    """Forward and the gradients of every present argument equal the float64 reference."""
    tensors = make_tensors(case, dtype=dtype, device=device, seed=seed)
    if tensors["offset"] is not None and offset_scale != 1.0:
        tensors["offset"] = tensors["offset"] * offset_scale
    expected_tensors = {k: None if t is None else t.detach().cpu().double() for k, t in tensors.items()}
    out, grads = forward_backward(run_op, case, tensors)
    expected, expected_grads = forward_backward(run_reference, case, expected_tensors)
    assert out.shape == expected.shape == (case.batch, case.out_channels, *case.out_size)
    assert out.dtype == dtype and out.device.type == device
    assert_close(out, expected, dtype, "output")
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert grads[name].shape == tensors[name].shape, name
        assert_close(grads[name], expected_grads[name], dtype, f"grad of {name}")


# ------------------------------------------------------------------------------------------------
# The reference itself (needs no compiled op).


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(stride=1, padding=0, dilation=1, groups=1),
        dict(stride=2, padding=1, dilation=1, groups=2),
        dict(stride=(2, 1, 3), padding=(1, 0, 2), dilation=(1, 2, 1), groups=1),
        dict(stride=1, padding=2, dilation=2, groups=4),
    ],
)
def test_reference_zero_offset_is_conv(n, geometry):
    geometry = {k: v[:n] if isinstance(v, tuple) else v for k, v in geometry.items()}
    case = Case.build(n, in_channels=4, out_channels=8, in_size=(7, 6, 5)[:n], kernel=(3, 2, 3)[:n],
                      **geometry)
    t = make_tensors(case)
    t["offset"] = torch.zeros_like(t["offset"])
    t["mask"] = torch.ones_like(t["mask"])
    expected = reference_conv(case, t)
    torch.testing.assert_close(run_reference(case, t), expected)
    torch.testing.assert_close(run_reference(case, {**t, "offset": None, "mask": None}), expected)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(stride=1, padding=0, dilation=1, groups=1, output_padding=0),
        dict(stride=2, padding=1, dilation=1, groups=2, output_padding=1),
        dict(stride=(3, 2, 1), padding=(1, 0, 1), dilation=(1, 2, 3), groups=1, output_padding=(2, 1, 2)),
    ],
)
def test_reference_transposed_zero_offset_is_conv_transpose(n, geometry):
    geometry = {k: v[:n] if isinstance(v, tuple) else v for k, v in geometry.items()}
    case = Case.build(n, transposed=True, in_channels=4, out_channels=6, in_size=(4, 3, 3)[:n],
                      kernel=(3, 2, 3)[:n], **geometry)
    t = make_tensors(case)
    t["offset"] = torch.zeros_like(t["offset"])
    t["mask"] = torch.ones_like(t["mask"])
    expected = reference_conv(case, t)
    torch.testing.assert_close(run_reference(case, t), expected)
    torch.testing.assert_close(run_reference(case, {**t, "offset": None, "mask": None}), expected)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_reference_adjoint_identity(n):
    case = Case.build(n, transposed=True, in_channels=4, out_channels=4, in_size=(4, 3, 3)[:n],
                      kernel=(2, 3, 2)[:n], stride=2, padding=1, output_padding=1, groups=2,
                      offset_groups=2, mask_groups=4, bias=False)
    t = make_tensors(case)
    x = t["input"]
    y = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64)
    forward = deform_conv_reference(y, t["weight"], t["offset"], t["mask"], None, case.stride, case.padding,
                                    case.dilation, case.groups)
    transposed = run_reference(case, t)
    assert forward.shape == x.shape
    torch.testing.assert_close((forward * x).sum(), (y * transposed).sum())


def test_reference_hand_computed_1d():
    """A half-step offset averages two neighbours; a step past the border reads zero."""
    x = torch.tensor([[[1.0, 2.0, 4.0, 8.0]]], dtype=torch.float64)
    w = torch.tensor([[[1.0]]], dtype=torch.float64)
    offset = torch.tensor([[[0.5, -0.25, 1.0, 0.5]]], dtype=torch.float64)
    out = deform_conv_reference(x, w, offset)
    torch.testing.assert_close(out, torch.tensor([[[1.5, 1.75, 8.0, 4.0]]], dtype=torch.float64))
    mask = torch.tensor([[[2.0, 1.0, 0.5, 0.0]]], dtype=torch.float64)
    out = deform_conv_reference(x, w, offset, mask, torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[[4.0, 2.75, 5.0, 1.0]]], dtype=torch.float64))
    # positions -1 and 4 (= size) and beyond read zero; -0.5 reads half of x[0]
    offset = torch.tensor([[[-1.0, -4.0, -2.5, 10.0]]], dtype=torch.float64)
    out = deform_conv_reference(x, w, offset)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 0.5, 0.0]]], dtype=torch.float64))


def test_reference_offset_layout_2d():
    """Channel 2k is the displacement along h, 2k + 1 along w (torchvision's layout)."""
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    offset[:, 0] = 1.0  # one row down
    out = deform_conv_reference(x, w, offset)
    torch.testing.assert_close(out[0, 0, :3], x[0, 0, 1:])
    torch.testing.assert_close(out[0, 0, 3], torch.zeros(4, dtype=torch.float64))
    offset = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    offset[:, 1] = 1.0  # one column right
    out = deform_conv_reference(x, w, offset)
    torch.testing.assert_close(out[0, 0, :, :3], x[0, 0, :, 1:])


# ------------------------------------------------------------------------------------------------
# The op against the reference.


@st.composite
def cases(draw, n: int, transposed: bool):
    groups = draw(st.sampled_from([1, 2]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    sampled = out_channels if transposed else in_channels
    divisors = [d for d in (1, 2, 3, 4, 6) if sampled % d == 0]
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
    max_size = {1: 9, 2: 6, 3: 4}[n]
    in_size = tuple(draw(st.integers(1, max_size)) for _ in range(n))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    case = Case(
        transposed=transposed, batch=draw(st.integers(1, 3)), in_channels=in_channels,
        out_channels=out_channels, in_size=in_size, kernel=kernel, stride=stride, padding=padding,
        dilation=dilation, output_padding=output_padding if transposed else (0,) * n, groups=groups,
        offset_groups=draw(st.sampled_from([0, *divisors])),
        mask_groups=draw(st.sampled_from([0, *divisors])),
        bias=draw(st.booleans()),
    )
    assume(case.is_valid() and math.prod(case.out_size) <= 400)
    return case


def _randomized(n, transposed):
    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
    @given(case=cases(n, transposed), seed=st.integers(0, 2**16), offset_scale=st.sampled_from([1.0, 3.0]))
    def test(device, case, seed, offset_scale):
        check_against_reference(case, device, seed=seed, offset_scale=offset_scale)

    return test


test_random_1d = _randomized(1, False)
test_random_2d = _randomized(2, False)
test_random_3d = _randomized(3, False)
test_random_transposed_1d = _randomized(1, True)
test_random_transposed_2d = _randomized(2, True)
test_random_transposed_3d = _randomized(3, True)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_float32_against_reference(device, n, transposed):
    case = Case.build(n, transposed=transposed, in_channels=4, out_channels=4, in_size=(9, 6, 4)[n - 1],
                      kernel=(3, 2, 3)[:n], stride=2 if transposed else 1, padding=1,
                      output_padding=1 if transposed else 0, groups=2, offset_groups=2, mask_groups=1)
    check_against_reference(case, device, dtype=torch.float32)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_integer_and_border_offsets(device, n, transposed):
    """Offsets that land exactly on integer positions, on -1 and on the size (forward only:
    interpolation is continuous there, though not differentiable)."""
    case = Case.build(n, transposed=transposed, in_channels=2, out_channels=2, in_size=4, kernel=3, padding=1)
    t = make_tensors(case, device=device)
    g = torch.Generator().manual_seed(3)
    t["offset"] = (torch.randint(-5, 6, t["offset"].shape, generator=g).double() / 2).to(device)
    out = run_op(case, t)
    expected = run_reference(case, {k: None if v is None else v.cpu() for k, v in t.items()})
    assert_close(out, expected)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
@pytest.mark.parametrize(
    "geometry",
    [
        dict(stride=1, padding=0, dilation=1, groups=1),
        dict(stride=2, padding=1, dilation=1, groups=2, output_padding=1),
        dict(stride=(2, 1, 3), padding=(1, 0, 2), dilation=(1, 2, 1), groups=1, output_padding=(1, 0, 2)),
        dict(stride=1, padding=2, dilation=3, groups=4, output_padding=2),  # output_padding >= stride
    ],
    ids=["plain", "strided-groups", "mixed", "dilated-groups"],
)
def test_zero_offset_unit_mask_is_conv(device, n, transposed, geometry):
    geometry = {k: v[:n] if isinstance(v, tuple) else v for k, v in geometry.items()}
    if not transposed:
        geometry.pop("output_padding", None)
    case = Case.build(n, transposed=transposed, in_channels=4, out_channels=8, in_size=(7, 6, 5)[:n],
                      kernel=(3, 2, 3)[:n], **geometry)
    assert case.is_valid()
    t = make_tensors(case, device=device)
    expected = reference_conv(case, t)
    zero_unit = {**t, "offset": torch.zeros_like(t["offset"]), "mask": torch.ones_like(t["mask"])}
    assert_close(run_op(case, zero_unit), expected)
    assert_close(run_op(case, {**t, "offset": None, "mask": None}), expected)
    assert_close(run_op(case, {**t, "offset": None, "mask": zero_unit["mask"]}), expected)
    assert_close(run_op(case, {**t, "offset": zero_unit["offset"], "mask": None}), expected)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_zero_offset_unit_mask_gradients_are_conv(device, n, transposed):
    case = Case.build(n, transposed=transposed, in_channels=4, out_channels=4, in_size=(7, 5, 4)[n - 1],
                      kernel=(3, 2, 3)[:n], stride=2, padding=1, output_padding=1 if transposed else 0,
                      groups=2, offset_groups=0, mask_groups=0)
    t = make_tensors(case, device=device)
    out, grads = forward_backward(run_op, case, t)
    expected, expected_grads = forward_backward(lambda c, ts: reference_conv(c, ts), case, t)
    assert_close(out, expected)
    for name in ("input", "weight", "bias"):
        assert_close(grads[name], expected_grads[name], name=name)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(stride=1, padding=1, output_padding=0, groups=1, offset_groups=1, mask_groups=1),
        dict(stride=2, padding=1, output_padding=1, groups=2, offset_groups=2, mask_groups=1),
        dict(stride=(2, 3, 1), padding=(0, 1, 1), output_padding=(1, 2, 0), groups=1, offset_groups=1,
             mask_groups=2),
    ],
)
def test_adjoint_identity(device, n, geometry):
    """<deform_conv(y, W, off, m), x> == <y, deform_conv_transpose(x, W, off, m)>."""
    geometry = {k: v[:n] if isinstance(v, tuple) else v for k, v in geometry.items()}
    case = Case.build(n, transposed=True, in_channels=4, out_channels=4, in_size=(5, 4, 3)[:n],
                      kernel=(3, 2, 2)[:n], dilation=(1, 2, 1)[:n], bias=False, **geometry)
    t = make_tensors(case, device=device)
    x, w, off, m = t["input"], t["weight"], t["offset"], t["mask"]
    y = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64).to(device)
    from dcn_plugin import ops

    forward = getattr(ops, f"deform_conv{n}d")(y, w, off, m, None, case.stride, case.padding, case.dilation,
                                             case.groups)
    transposed = run_op(case, t)
    assert forward.shape == x.shape and transposed.shape == y.shape
    lhs, rhs = (forward * x).sum(), (y * transposed).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_input_smaller_than_kernel(device, n, transposed):
    """A 2-wide map and a 3-wide kernel are made valid by padding 1 (transposed: a 1-wide map)."""
    case = Case.build(n, transposed=transposed, in_channels=2, out_channels=3, in_size=1 if transposed else 2,
                      kernel=3, padding=1, offset_groups=1, mask_groups=1)
    assert case.is_valid()
    check_against_reference(case, device)


@pytest.mark.parametrize(
    "n, transposed", [(2, False), (2, True), (3, False), (3, True)], ids=["2d", "2d-transposed", "3d",
                                                                        "3d-transposed"]
)
def test_tiny_workspace_chunks(device, n, transposed, tiny_workspace):
    """A 4 KiB column buffer splits the columns into many chunks; nothing changes."""
    case = Case.build(n, transposed=transposed, batch=3, in_channels=4, out_channels=4,
                      in_size=(6, 4)[n - 2], kernel=3, stride=1, padding=1, groups=2, offset_groups=2,
                      mask_groups=2)
    check_against_reference(case, device)
    check_against_reference(dataclasses.replace(case, offset_groups=0, mask_groups=0), device, seed=1)


def test_transpose_reference_signature():
    """The transposed reference takes output_padding before dilation, like the op."""
    case = Case.build(1, transposed=True, in_channels=2, out_channels=2, in_size=3, kernel=2, stride=2,
                      dilation=3, output_padding=2)
    t = make_tensors(case)
    out = deform_conv_transpose_reference(t["input"], t["weight"], None, None, None, 2, 1, 2, 3)
    assert out.shape[-1] == (3 - 1) * 2 - 2 + 3 * (2 - 1) + 2 + 1


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_depthwise_against_reference(device, n, transposed, masked):
    """groups == channels on both sides takes the depthwise path (no column matrix): same answers,
    forward and every gradient, with offset groups and mask groups of their own."""
    case = Case.build(n, transposed=transposed, batch=2, in_channels=4, out_channels=4,
                      in_size=(7, 5, 4)[n - 1], kernel=(3, 2, 3)[:n], stride=(1, 2, 1)[:n], padding=1,
                      groups=4, offset_groups=2, mask_groups=4 if masked else 0)
    check_against_reference(case, device)
    check_against_reference(dataclasses.replace(case, offset_groups=0), device, seed=1)


def test_depthwise_chunked_against_reference(tiny_workspace):
    case = Case.build(2, batch=2, in_channels=3, out_channels=3, in_size=6, kernel=3, padding=1, groups=3,
                      offset_groups=3, mask_groups=1)
    check_against_reference(case, "cpu")
    check_against_reference(dataclasses.replace(case, transposed=True), "cpu", seed=2)


def test_float32_products_fall_back_to_mm_without_onednn():
    """float32 CPU products use torch's private oneDNN op mkldnn::_linear_pointwise, looked up once
    with its expected signature. Where a torch lacks it or has changed it, the look-up must fail
    quietly and every product fall back to at::mm: forced here through the same guarded look-up
    (an op of another signature, a missing op), with the same results."""
    lookup = torch.ops.dcn_plugin._use_onednn_linear
    case = Case.build(2, batch=2, in_channels=6, out_channels=4, in_size=(7, 6), kernel=(3, 3), padding=1,
                      groups=2, offset_groups=2, mask_groups=1)
    tensors = make_tensors(case, dtype=torch.float32, seed=4)
    with_onednn = forward_backward(run_op, case, tensors)
    try:
        assert not lookup("aten::mm")  # exists, with another signature: refused, not thrown
        assert not lookup("dcn_plugin_no_such::op")
        with_mm = forward_backward(run_op, case, tensors)
    finally:
        found = lookup("mkldnn::_linear_pointwise")
    assert found == torch.backends.mkldnn.is_available()
    expected = forward_backward(run_reference, case, {k: None if t is None else t.double()
                                                      for k, t in tensors.items()})
    assert_close(with_mm[0], expected[0], torch.float32, "output")
    assert_close(with_mm[0], with_onednn[0], torch.float32, "output vs oneDNN")
    for name, grad in with_mm[1].items():
        assert_close(grad, expected[1][name], torch.float32, name)
        assert_close(grad, with_onednn[1][name], torch.float32, f"{name} vs oneDNN")
