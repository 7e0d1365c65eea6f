"""Properties of the op: low-precision error, batch sizes, memory layouts, unbatched input,
argument forms, absent arguments, gradients that are not requested, and the mask activations."""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    Case,
    assert_low_precision_like_conv,
    forward_backward,
    make_tensors,
    reference_conv,
    relative_error,
    run_op,
    run_reference,
)

from dcn_plugin import ops

DIMS_TRANSPOSED = [(n, t) for n in (1, 2, 3) for t in (False, True)]
IDS = [f"{n}d{'-transposed' if t else ''}" for n, t in DIMS_TRANSPOSED]


def _case(n: int, transposed: bool, **kwargs) -> Case:
    defaults = dict(in_channels=4, out_channels=4, in_size=(8, 5, 4)[n - 1], kernel=(3, 2, 3)[:n],
                    stride=2 if transposed else 1, padding=1, output_padding=1 if transposed else 0,
                    groups=2, offset_groups=2, mask_groups=1)
    case = Case.build(n, transposed=transposed, **{**defaults, **kwargs})
    assert case.is_valid(), case
    return case


def _cpu64(tensors):
    return {k: None if t is None else t.detach().cpu().double() for k, t in tensors.items()}


def assert_matches_reference(case, tensors, out=None, grads=None):
    """``out``/``grads`` (computed by the op, any layout) equal the float64 reference."""
    expected, expected_grads = forward_backward(run_reference, case, _cpu64(tensors))
    if out is None:
        out, grads = forward_backward(run_op, case, tensors)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-10, rtol=1e-8)
    for name, grad in (grads or {}).items():
        assert grad.shape == tensors[name].shape, name
        torch.testing.assert_close(grad.cpu().double(), expected_grads[name], atol=1e-10, rtol=1e-8,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


# ------------------------------------------------------------------------------------------------
# fp16 / bf16: at most twice the error that plain convolution makes in that dtype.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_low_precision_error_at_most_twice_conv(device, dtype, n, transposed):
    size = {1: 64, 2: 12, 3: 6}[n]
    case = _case(n, transposed, batch=2, in_channels=16, out_channels=16, in_size=size, kernel=3,
                 offset_groups=2, mask_groups=2)
    assert_low_precision_like_conv(run_op, case, dtype, device)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_float32(device, n, transposed):
    case = _case(n, transposed)
    t = make_tensors(case, dtype=torch.float32, device=device)
    out, grads = forward_backward(run_op, case, t)
    expected, expected_grads = forward_backward(run_reference, case, _cpu64(t))
    assert out.dtype == torch.float32
    assert relative_error(out, expected) < 1e-5
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert relative_error(grad, expected_grads[name]) < 1e-5, name


# ------------------------------------------------------------------------------------------------
# Batch sizes, layouts, unbatched input.


@pytest.mark.parametrize("batch", [0, 1, 65])
@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_batch_sizes(device, batch, n, transposed):
    case = _case(n, transposed, batch=batch, in_size=(6, 4, 3)[n - 1], kernel=(3, 2, 2)[:n])
    t = make_tensors(case, device=device)
    out, grads = forward_backward(run_op, case, t)
    assert out.shape == (batch, case.out_channels, *case.out_size)
    assert all(grads[name].shape == t[name].shape for name in grads)
    if batch == 0:
        assert torch.count_nonzero(grads["weight"]) == 0
        torch.testing.assert_close(grads["bias"], torch.zeros_like(grads["bias"]))
    assert_matches_reference(case, t, out, grads)


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_zero_channels(device, transposed):
    """No channels on either side is an empty but valid convolution: sums over no channels are zero."""
    for in_channels, out_channels in ((0, 3), (3, 0)):
        x = torch.randn(2, in_channels, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
        shape = (in_channels, out_channels, 3, 3) if transposed else (out_channels, in_channels, 3, 3)
        w = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
        grid = (5, 5)
        off = torch.randn(2, 18, *grid, dtype=torch.float64, device=device, requires_grad=True)
        m = torch.rand(2, 9, *grid, dtype=torch.float64, device=device, requires_grad=True)
        op = ops.deform_conv_transpose2d if transposed else ops.deform_conv2d
        out = op(x, w, off, m, padding=1)
        torch.testing.assert_close(out, x.new_zeros(2, out_channels, 5, 5))
        out.sum().backward()
        for t in (x, w, off, m):
            torch.testing.assert_close(t.grad, torch.zeros_like(t))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other element of the last dim)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _permuted(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (dims 0 and 1 swapped in memory)."""
    if t.dim() == 1:
        return _strided(t)
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("layout", [_strided, _permuted], ids=["strided", "permuted"])
@pytest.mark.parametrize("name", ["input", "weight", "offset", "mask", "all"])
@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_non_contiguous(device, layout, name, n, transposed):
    case = _case(n, transposed, batch=3)
    t = make_tensors(case, device=device)
    names = ["input", "weight", "offset", "mask", "bias"] if name == "all" else [name]
    for key in names:
        t[key] = layout(t[key])
        assert not t[key].is_contiguous()
    assert_matches_reference(case, t)


@pytest.mark.parametrize("n, transposed", [(2, False), (2, True), (3, False), (3, True)],
                         ids=["2d", "2d-transposed", "3d", "3d-transposed"])
def test_channels_last(device, n, transposed):
    sampled, other = 6, 4  # offset groups divide the sampled channels
    case = _case(n, transposed, batch=2, in_channels=other if transposed else sampled,
                 out_channels=sampled if transposed else other, groups=2, offset_groups=3)
    t = make_tensors(case, device=device)
    memory_format = torch.channels_last if n == 2 else torch.channels_last_3d
    for key in ("input", "offset", "mask", "weight"):
        t[key] = t[key].to(memory_format=memory_format)
    assert not t["input"].is_contiguous()
    out, grads = forward_backward(run_op, case, t)
    assert_matches_reference(case, t, out, grads)
    contiguous = {k: None if v is None else v.contiguous() for k, v in t.items()}
    torch.testing.assert_close(out, run_op(case, contiguous), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", ["input", "weight", "neither"])
@pytest.mark.parametrize("n, transposed", [(2, False), (2, True), (3, False), (3, True)],
                         ids=["2d", "2d-transposed", "3d", "3d-transposed"])
def test_output_layout_is_torch_convolutions(device, layout, n, transposed):
    """The output is channels-last where torch's convolution makes it so (in float32, where it runs
    oneDNN: when its input or its weight is channels-last), and each gradient of the backward op
    has its tensor's layout."""
    case = _case(n, transposed, batch=2, in_channels=6, out_channels=6, offset_groups=3, mask_groups=3)
    t = make_tensors(case, device=device)
    memory_format = torch.channels_last if n == 2 else torch.channels_last_3d
    names = {"input": ("input", "offset", "mask"), "weight": ("weight",), "neither": ()}[layout]
    for key in names:
        t[key] = t[key].to(memory_format=memory_format)
    out = run_op(case, t)
    conv = reference_conv(case, {k: None if v is None else v.float() for k, v in t.items()})
    assert out.is_contiguous(memory_format=memory_format) == (layout != "neither")
    assert out.is_contiguous(memory_format=memory_format) == conv.is_contiguous(memory_format=memory_format)
    assert out.is_contiguous() == conv.is_contiguous()
    grad_output = torch.randn_like(out)
    args = (grad_output, t["input"], t["weight"], t["offset"], t["mask"], list(case.stride),
            list(case.padding), list(case.dilation), transposed, list(case.output_padding), case.groups,
            [True] * 4)
    grads = torch.ops.dcn_plugin.deform_conv_backward(*args)
    for name, grad in zip(("input", "weight", "offset", "mask"), grads):
        assert grad.is_contiguous(memory_format=memory_format) == (name in names), name


def _compiled_instruction_sets():
    """The instruction sets whose sweeps this build has and this CPU runs (switched to, then back)."""
    previous = torch.ops.dcn_plugin._cpu_isa()
    try:
        return sorted({torch.ops.dcn_plugin._cpu_isa(isa) for isa in ("DEFAULT", "AVX2", "AVX512")})
    finally:
        torch.ops.dcn_plugin._cpu_isa(previous)


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_every_instruction_set(isa, n, transposed):
    """The sweeps compiled for each instruction set match the reference, on channel runs of whole
    vectors plus a tail, split by offset, mask and convolution groups, and depthwise."""
    if isa not in _compiled_instruction_sets():
        pytest.skip(f"this CPU or build does not run the {isa} sweeps")
    previous = torch.ops.dcn_plugin._cpu_isa(isa)
    try:
        assert torch.ops.dcn_plugin._cpu_isa() == isa
        size = (9, 5, 4)[n - 1]
        grouped = _case(n, transposed, batch=2, in_channels=38, out_channels=38, in_size=size, groups=2,
                        offset_groups=2, mask_groups=19)
        depthwise = _case(n, transposed, batch=2, in_channels=19, out_channels=19, in_size=size, groups=19,
                          offset_groups=1, mask_groups=1)
        for case in (grouped, depthwise):
            t = make_tensors(case)
            assert_matches_reference(case, t)
            t32 = {k: None if v is None else v.float() for k, v in t.items()}
            out, grads = forward_backward(run_op, case, t32)
            expected, expected_grads = forward_backward(run_reference, case, t)
            assert relative_error(out, expected) < 1e-5
            for name, grad in grads.items():
                assert relative_error(grad, expected_grads[name]) < 1e-5, name
    finally:
        torch.ops.dcn_plugin._cpu_isa(previous)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no-offset"])
def test_unbatched(device, n, transposed, with_offset):
    case = _case(n, transposed, batch=1, offset_groups=2 if with_offset else 0)
    t = make_tensors(case, device=device)
    batched = run_op(case, t)
    single = {k: v if v is None or k in ("weight", "bias") else v[0] for k, v in t.items()}
    out, grads = forward_backward(run_op, case, single)
    assert out.shape == batched.shape[1:]
    torch.testing.assert_close(out, batched[0], atol=1e-12, rtol=1e-12)
    _, expected_grads = forward_backward(run_reference, case, _cpu64(t))
    for name, grad in grads.items():
        expected = expected_grads[name] if name in ("weight", "bias") else expected_grads[name][0]
        torch.testing.assert_close(grad.cpu(), expected, atol=1e-10, rtol=1e-8)


def _like(form, value: int):
    """``value`` written the way ``form`` is: an int, a tuple or a list (of the same length)."""
    if isinstance(form, int):
        return value
    return type(form)([value] * len(form))


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
@pytest.mark.parametrize("form", [2, (2, 2), [2, 2], (2,)], ids=["int", "tuple", "list", "1-tuple"])
def test_ints_tuples_and_lists(device, transposed, form):
    case = _case(2, transposed, stride=2, padding=1, dilation=2, output_padding=1 if transposed else 0)
    t = make_tensors(case, device=device)
    args = [t[k] for k in ("input", "weight", "offset", "mask", "bias")]
    expected = run_op(case, t)  # tuples of 2
    if transposed:
        out = ops.deform_conv_transpose2d(*args, stride=form, padding=_like(form, 1),
                                          output_padding=_like(form, 1), dilation=form, groups=2)
    else:
        out = ops.deform_conv2d(*args, stride=form, padding=_like(form, 1), dilation=form, groups=2)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # the generic entry point, with the same meaning
    out = ops.deform_conv(*args, stride=form, padding=_like(form, 1), dilation=form, groups=2,
                          transposed=transposed, output_padding=_like(form, 1 if transposed else 0))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
@pytest.mark.parametrize("absent", [(), ("offset",), ("mask",), ("bias",), ("offset", "mask"),
                                    ("offset", "mask", "bias")], ids=lambda a: "-".join(a) or "none")
def test_backward_with_absent_arguments(device, n, transposed, absent):
    case = _case(n, transposed, offset_groups=0 if "offset" in absent else 2,
                 mask_groups=0 if "mask" in absent else 1, bias="bias" not in absent)
    t = make_tensors(case, device=device)
    out, grads = forward_backward(run_op, case, t)
    assert set(grads) == {"input", "weight", "offset", "mask", "bias"} - set(absent)
    assert_matches_reference(case, t, out, grads)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
@pytest.mark.parametrize("wanted", ["input", "weight", "offset", "mask", "bias"])
def test_only_requested_gradients(device, n, transposed, wanted):
    """Only one argument requires grad: its gradient is right and the others get none."""
    case = _case(n, transposed)
    t = make_tensors(case, device=device)
    t[wanted] = t[wanted].clone().requires_grad_(True)
    out = run_op(case, t)
    grad_output = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, t[wanted], grad_output)
    ref = {k: v.detach().cpu().double() for k, v in t.items()}
    ref[wanted].requires_grad_(True)
    (expected,) = torch.autograd.grad(run_reference(case, ref), ref[wanted], grad_output.cpu())
    torch.testing.assert_close(grad.cpu(), expected, atol=1e-10, rtol=1e-8)
    assert all(t[k].grad is None for k in t)


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_backward_op_output_mask(device, transposed):
    """``deform_conv_backward`` computes what ``output_mask`` asks for; the rest is empty, shape (0,)."""
    case = _case(2, transposed)
    t = make_tensors(case, device=device)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64,
                              device=device)
    args = (grad_output, t["input"], t["weight"], t["offset"], t["mask"], list(case.stride),
            list(case.padding), list(case.dilation), transposed, list(case.output_padding), case.groups)
    full = torch.ops.dcn_plugin.deform_conv_backward(*args, [True] * 4)
    names = ("input", "weight", "offset", "mask")
    for name, grad in zip(names, full):
        assert grad.shape == t[name].shape, name
    for i in range(4):
        output_mask = [j == i for j in range(4)]
        result = torch.ops.dcn_plugin.deform_conv_backward(*args, output_mask)
        for j, (name, grad) in enumerate(zip(names, result)):
            if j == i:
                torch.testing.assert_close(grad, full[j], atol=1e-12, rtol=1e-12, msg=name)
            else:
                assert grad.shape == (0,), name
    # nothing asked for: four empty tensors, distinct (the schema says outputs do not alias)
    result = torch.ops.dcn_plugin.deform_conv_backward(*args, [False] * 4)
    assert all(grad.shape == (0,) for grad in result)
    assert len({id(grad) for grad in result}) == 4
    assert not any(torch._C._overlaps(a, b) for i, a in enumerate(result) for b in result[i + 1:])
    # absent offset and mask: their gradients are empty even when asked for
    args = (*args[:3], None, None, *args[5:])
    for output_mask in ([True] * 4, [False, False, True, True]):
        result = torch.ops.dcn_plugin.deform_conv_backward(*args, output_mask)
        assert result[2].shape == (0,) and result[3].shape == (0,)


def test_large_values_of_kernel_and_channels(device):
    """Channels and kernel points that do not fit one small tile (more than 64 of each)."""
    case = Case.build(2, batch=1, in_channels=80, out_channels=3, in_size=(5, 12), kernel=(3, 25),
                      padding=(1, 12), offset_groups=2, mask_groups=4)
    assert_matches_reference(case, make_tensors(case, device=device))


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_deterministic_backward(device, transposed):
    """Under ``use_deterministic_algorithms`` the backward is bitwise repeatable (or says it cannot be)."""
    case = _case(2, transposed, batch=3, in_channels=8, out_channels=8, in_size=9)
    t = make_tensors(case, dtype=torch.float32, device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, first = forward_backward(run_op, case, t)
        _, second = forward_backward(run_op, case, t)
    except RuntimeError as exc:  # CUDA scatters with atomic adds; the error must name the op
        assert "determinis" in str(exc) and "dcn_plugin::deform_conv" in str(exc), str(exc)
        return
    finally:
        torch.use_deterministic_algorithms(previous)
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=0, rtol=0, msg=name)


def test_workspace_limit_round_trip():
    previous = ops.set_workspace_limit(1 << 20)
    try:
        assert previous > 0
        assert ops.set_workspace_limit(12345) == 1 << 20
    finally:
        ops.set_workspace_limit(previous)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_tiny_workspace_float32_large_batch(device, n, transposed, tiny_workspace):
    case = _case(n, transposed, batch=9, in_size=(6, 4, 3)[n - 1])
    t = make_tensors(case, device=device)
    assert_matches_reference(case, t)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_any_workspace_budget(device, n, transposed):
    """From part of an image to all 7 images per chunk (whole images share one column buffer and
    one matrix product, the last chunk holding fewer), the result is the same."""
    case = _case(n, transposed, batch=7, in_channels=6, out_channels=4, in_size=(24, 8, 5)[n - 1])
    t = make_tensors(case, device=device)
    previous = ops.set_workspace_limit(1 << 12)
    try:
        for budget in (1 << 12, 1 << 16, 1 << 18, 1 << 22):
            ops.set_workspace_limit(budget)
            assert_matches_reference(case, t)
    finally:
        ops.set_workspace_limit(previous)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("groups", [2, 8], ids=["grouped", "depthwise"])
def test_rows_shared_among_threads(n, transposed, batch, groups):
    """With 1 to 4 threads, fewer or more images than threads (the scatter onto the image then goes
    to private copies, or each thread owns whole images), the CPU op matches the reference and
    repeats itself bitwise."""
    case = _case(n, transposed, batch=batch, in_channels=8, out_channels=8, groups=groups,
                 in_size=(256, 16, 7)[n - 1])
    t = make_tensors(case)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3, 4):
            torch.set_num_threads(count)
            out, grads = forward_backward(run_op, case, t)
            assert_matches_reference(case, t, out, grads)
            again, grads_again = forward_backward(run_op, case, t)
            torch.testing.assert_close(again, out, atol=0, rtol=0)
            for name in grads:
                torch.testing.assert_close(grads_again[name], grads[name], atol=0, rtol=0, msg=name)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Mask activations.


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("mask_groups", [1, 3])
@pytest.mark.parametrize("batched", [True, False])
def test_mask_softmax(device, n, mask_groups, batched):
    kernel = (3, 2, 2)[:n]
    num_kernel = math.prod(kernel)
    grid = (5, 4, 3)[:n]
    mask = torch.randn(2, mask_groups * num_kernel, *grid, dtype=torch.float64, device=device) * 3
    fn = getattr(ops, f"mask_softmax{n}d")
    out = fn(mask, kernel) if batched else fn(mask[0], kernel)
    if not batched:
        out = out.unsqueeze(0)
        mask = mask[:1]
    assert out.shape == mask.shape
    grouped = out.reshape(out.shape[0], mask_groups, num_kernel, *grid)
    torch.testing.assert_close(grouped.sum(2), torch.ones_like(grouped.sum(2)))
    # by hand, one location and group at a time
    for g in range(mask_groups):
        where = (0, slice(g * num_kernel, (g + 1) * num_kernel), *([1] * n))
        logits = mask[where]
        expected = logits.exp() / logits.exp().sum()
        torch.testing.assert_close(out[where], expected)
    # an int kernel size means a cube
    cube = torch.randn(1, 2 * 3**n, *grid, device=device)
    torch.testing.assert_close(fn(cube, 3), fn(cube, (3,) * n))
    torch.testing.assert_close(ops.mask_softmax(mask, kernel), fn(mask, kernel))


def test_mask_sigmoid(device):
    mask = torch.randn(2, 9, 4, 4, device=device)
    torch.testing.assert_close(ops.mask_sigmoid(mask), 1 / (1 + torch.exp(-mask)))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_softmax_mask_in_op(device, n):
    """A softmax mask of a deformable layer, end to end, gradient included."""
    case = _case(n, False, offset_groups=2, mask_groups=2)
    t = make_tensors(case, device=device)
    logits = t["mask"].clone().requires_grad_(True)
    fn = getattr(ops, f"mask_softmax{n}d")
    out = run_op(case, {**t, "mask": fn(logits, case.kernel)})
    out.sum().backward()
    ref_logits = logits.detach().cpu().clone().requires_grad_(True)
    expected = run_reference(case, {**_cpu64(t), "mask": fn(ref_logits, case.kernel)})
    expected.sum().backward()
    torch.testing.assert_close(out.detach().cpu(), expected.detach())
    torch.testing.assert_close(logits.grad.cpu(), ref_logits.grad)

