"""Tests of the ``nn`` modules in ``dcn_plugin.ops.modules``.

Oracles: ``torch.nn.Conv{N}d`` / ``ConvTranspose{N}d`` with the same weights (zero offsets, and
constant offsets or masks that turn deformable convolution into an ordinary convolution of a
shifted input or a rescaled kernel), and the pure-PyTorch reference of ``tests/reference.py`` for
packed modules with random (non-trivial) generators. Everything runs in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import deform_conv_reference, deform_conv_transpose_reference
from torch import nn

from dcn_plugin import ops

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
DIMS = [1, 2, 3]

# Shapes chosen so that stride, padding, dilation and groups all differ from their defaults.
CONV_CASES = {
    1: dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1, dilation=2, groups=2,
            size=(11,)),
    2: dict(in_channels=6, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
            groups=2, size=(9, 8)),
    3: dict(in_channels=4, out_channels=6, kernel_size=(2, 3, 1), stride=(1, 2, 1), padding=(0, 1, 1),
            dilation=(2, 1, 1), groups=1, size=(5, 6, 4)),
}
TRANSPOSE_CASES = {
    1: dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1, output_padding=1, dilation=1,
            groups=2, size=(7,)),
    2: dict(in_channels=6, out_channels=4, kernel_size=(3, 2), stride=(2, 3), padding=(1, 0),
            output_padding=(1, 2), dilation=(1, 1), groups=2, size=(5, 4)),
    3: dict(in_channels=4, out_channels=6, kernel_size=(2, 3, 2), stride=(1, 2, 2), padding=(0, 1, 0),
            output_padding=(0, 1, 0), dilation=(2, 1, 1), groups=1, size=(4, 3, 3)),
}


def module_class(n: int, transposed: bool, packed: bool = False):
    name = ("Packed" if packed else "") + ("DeformConvTranspose" if transposed else "DeformConv") + f"{n}d"
    return getattr(ops, name)


def torch_class(n: int, transposed: bool):
    return getattr(nn, f"ConvTranspose{n}d" if transposed else f"Conv{n}d")


def case_args(n: int, transposed: bool, bias: bool = True):
    args = dict((TRANSPOSE_CASES if transposed else CONV_CASES)[n])
    size = args.pop("size")
    args["bias"] = bias
    return args, size


def build(n, transposed, device, packed=False, bias=True, seed=0, **extra):
    """Our module, the matching torch module with the same weight and bias, and a random input."""
    args, size = case_args(n, transposed, bias)
    torch.manual_seed(seed)
    module = module_class(n, transposed, packed)(**args, **extra, device=device, dtype=DTYPE)
    reference = torch_class(n, transposed)(**args, device=device, dtype=DTYPE)
    with torch.no_grad():
        reference.weight.copy_(module.weight)
        if bias:
            reference.bias.copy_(module.bias)
    x = torch.randn(2, args["in_channels"], *size, device=device, dtype=DTYPE)
    return module, reference, x


def num_kernel_points(module) -> int:
    return math.prod(module.kernel_size)


def grid_of(module, reference, x):
    """Spatial shape offset and mask live on: output grid (conv) or input grid (transposed)."""
    return tuple(x.shape[2:]) if module.transposed else tuple(reference(x).shape[2:])


def run_reference(module, x, offset, mask):
    """The pure-PyTorch oracle with the module's weight and hyper-parameters."""
    common = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                  groups=module.groups)
    if module.transposed:
        return deform_conv_transpose_reference(x, module.weight, offset, mask, module.bias,
                                               output_padding=module.output_padding, **common)
    return deform_conv_reference(x, module.weight, offset, mask, module.bias, **common)


# ----------------------------------------------------------------------------------------------------------
# Construction: like nn.ConvNd / nn.ConvTransposeNd


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("n", DIMS)
@pytest.mark.parametrize("bias", [True, False])
def test_parameters_and_init_match_torch(n, transposed, packed, bias):
    args, _ = case_args(n, transposed, bias)
    torch.manual_seed(123)
    ours = module_class(n, transposed, packed)(**args)
    torch.manual_seed(123)
    theirs = torch_class(n, transposed)(**args)

    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "transposed", "output_padding", "padding_mode"):
        assert getattr(ours, name) == getattr(theirs, name), name
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    conv_keys = list(theirs_state)
    assert conv_keys == (["weight", "bias"] if bias else ["weight"])
    assert list(ours_state)[: len(conv_keys)] == conv_keys
    for key in conv_keys:
        # Same shapes and the same initialisation as torch (same random stream).
        torch.testing.assert_close(ours_state[key], theirs_state[key], rtol=0, atol=0)
    if not packed:
        assert list(ours_state) == conv_keys
    assert isinstance(ours, nn.modules.conv._ConvNd)
    assert isinstance(ours, module_class(n, transposed, False))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("n", DIMS)
@pytest.mark.parametrize("modulated", [False, True])
def test_packed_generator_layout(n, transposed, modulated):
    args, _ = case_args(n, transposed)
    og, mg = 2, 2
    module = module_class(n, transposed, True)(**args, offset_groups=og, mask_groups=mg, modulated=modulated)
    k = num_kernel_points(module)
    generator_kernel = (1,) * n if transposed else module.kernel_size
    expected = {
        "conv_offset.weight": (og * n * k, args["in_channels"], *generator_kernel),
        "conv_offset.bias": (og * n * k,),
    }
    if modulated:
        expected.update({"conv_mask.weight": (mg * k, args["in_channels"], *generator_kernel),
                         "conv_mask.bias": (mg * k,)})
    state = module.state_dict()
    assert {key: tuple(v.shape) for key, v in state.items() if key.startswith("conv_")} == expected
    for key in expected:
        assert torch.count_nonzero(state[key]) == 0, key
    generator = torch_class(n, False)
    assert type(module.conv_offset) is generator
    if transposed:
        assert module.conv_offset.stride == (1,) * n and module.conv_offset.padding == (0,) * n
    else:
        assert (module.conv_offset.stride, module.conv_offset.padding, module.conv_offset.dilation) == (
            module.stride, module.padding, module.dilation)
    assert (module.conv_mask is not None) == modulated


def test_deformable_false_has_no_offset_generator():
    module = ops.PackedDeformConv2d(4, 4, 3, deformable=False, modulated=True)
    assert module.conv_offset is None
    assert sorted(module.state_dict()) == ["bias", "conv_mask.bias", "conv_mask.weight", "weight"]


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("n", DIMS)
def test_reset_parameters_keeps_generators_zero(n, transposed):
    args, _ = case_args(n, transposed)
    module = module_class(n, transposed, True)(**args, modulated=True)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    weight_before = module.weight.detach().clone()
    module.reset_parameters()
    for name, p in module.named_parameters():
        if name.startswith("conv_"):
            assert torch.count_nonzero(p) == 0, name
    assert not torch.equal(module.weight, weight_before)
    assert torch.count_nonzero(module.weight) == module.weight.numel()


# ----------------------------------------------------------------------------------------------------------
# Argument validation


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular", "bogus"])
def test_padding_mode_other_than_zeros_raises(transposed, packed, padding_mode):
    with pytest.raises(ValueError, match="padding_mode"):
        module_class(2, transposed, packed)(4, 4, 3, padding=1, padding_mode=padding_mode)


@pytest.mark.parametrize("name", ["offset_groups", "mask_groups"])
@pytest.mark.parametrize("value", [0, -1, 4, 1.0, True])
def test_bad_groups_raise(name, value):
    # in_channels=6: 4 does not divide it; 0, -1, floats and bools are not positive ints.
    with pytest.raises(ValueError, match=name):
        ops.PackedDeformConv2d(6, 4, 3, modulated=True, **{name: value})


@pytest.mark.parametrize("name", ["offset_groups", "mask_groups"])
def test_transposed_groups_must_divide_out_channels(name):
    # The transposed op samples its output: 3 divides out_channels=9 but not in_channels=4 ...
    module = ops.PackedDeformConvTranspose2d(4, 9, 3, modulated=True, **{name: 3})
    assert getattr(module, name) == 3
    # ... and 2 divides in_channels=4 but not out_channels=9.
    with pytest.raises(ValueError, match=f"{name}.*out_channels"):
        ops.PackedDeformConvTranspose2d(4, 9, 3, modulated=True, **{name: 2})


def test_bad_activations_raise():
    with pytest.raises(ValueError, match="mask_activation"):
        ops.PackedDeformConv2d(4, 4, 3, modulated=True, mask_activation="relu")
    with pytest.raises(ValueError, match="offset_activation"):
        ops.PackedDeformConv2d(4, 4, 3, offset_activation="softmax")


def test_string_padding_of_transposed_raises():
    with pytest.raises(ValueError, match="padding"):
        ops.DeformConvTranspose2d(4, 4, 3, padding="same")


def test_abstract_bases_refuse_construction():
    from dcn_plugin.ops.modules import _DeformConvNd, _DeformConvTransposeNd

    for base in (_DeformConvNd, _DeformConvTransposeNd):
        with pytest.raises(TypeError):
            base(4, 4, 3)


# ----------------------------------------------------------------------------------------------------------
# Forward against ordinary convolution


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("n", DIMS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("inputs", ["none", "zero_offset", "zero_offset_ones_mask", "ones_mask"])
def test_zero_offset_equals_conv(device, n, transposed, bias, inputs):
    module, reference, x = build(n, transposed, device, bias=bias)
    k, grid = num_kernel_points(module), grid_of(module, reference, x)
    offset = mask = None
    if "zero_offset" in inputs:
        offset = torch.zeros(2, 2 * n * k, *grid, device=device, dtype=DTYPE)  # 2 offset groups
    if "ones_mask" in inputs:
        mask = torch.ones(2, 2 * k, *grid, device=device, dtype=DTYPE)  # 2 mask groups
    expected = reference(x)
    torch.testing.assert_close(module(x, offset, mask), expected, **TOL)

    # Unbatched input (and unbatched offset and mask).
    unbatched = module(x[1], None if offset is None else offset[1], None if mask is None else mask[1])
    torch.testing.assert_close(unbatched, expected[1], **TOL)


@pytest.mark.parametrize("n", DIMS)
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("dilation", [1, 2])
def test_string_padding_matches_torch(device, n, padding, dilation):
    # Kernel 4 with 'same' pads asymmetrically (1 left, 2 right with dilation 1).
    torch.manual_seed(0)
    module = module_class(n, False)(3, 5, 4, padding=padding, dilation=dilation, device=device, dtype=DTYPE)
    reference = torch_class(n, False)(3, 5, 4, padding=padding, dilation=dilation, device=device, dtype=DTYPE)
    reference.load_state_dict(module.state_dict())
    x = torch.randn(2, 3, *(9, 8, 7)[:n], device=device, dtype=DTYPE)
    expected = reference(x)
    if padding == "same":
        assert expected.shape[2:] == x.shape[2:]
    offset = torch.zeros(2, n * 4**n, *expected.shape[2:], device=device, dtype=DTYPE)
    torch.testing.assert_close(module(x), expected, **TOL)
    torch.testing.assert_close(module(x, offset), expected, **TOL)
    torch.testing.assert_close(module(x[0], offset[0]), expected[0], **TOL)


@pytest.mark.parametrize("n", DIMS)
def test_transposed_output_size(device, n):
    module, reference, x = build(n, True, device)
    # output_size picks the output padding within [min, min + stride - 1], overriding the attribute.
    module.output_padding = reference.output_padding = (0,) * n
    smallest = reference(x).shape[2:]
    for target in ([s + st - 1 for s, st in zip(smallest, module.stride)], list(smallest)):
        expected = reference(x, output_size=target)
        assert list(expected.shape[2:]) == target
        torch.testing.assert_close(module(x, output_size=target), expected, **TOL)
        torch.testing.assert_close(module(x, output_size=[2, module.out_channels, *target]), expected, **TOL)


def shifted(t: torch.Tensor, dim: int, channels: slice) -> torch.Tensor:
    """``t`` with ``out[:, c, ..., i] = t[:, c, ..., i + 1]`` along ``dim`` for ``channels``, 0 at the end."""
    out = t.clone()
    part = out[:, channels]
    part.zero_()
    src = t[:, channels].narrow(dim, 1, t.shape[dim] - 1)
    part.narrow(dim, 0, t.shape[dim] - 1).copy_(src)
    return out


@pytest.mark.parametrize("n", DIMS)
def test_constant_integer_offset_shifts_the_input(device, n):
    """A generated offset of +1 along dim d for offset group 1 equals a convolution of the zero-padded
    input whose group-1 channels are shifted by one along d. This pins the offset layout (channel
    ``(g * K + k) * N + d``) and the channel split of offset groups."""
    module, reference, x = build(n, False, device, packed=True, offset_groups=2)
    k = num_kernel_points(module)
    c = module.in_channels
    padded = F.pad(x, [p for pad in reversed(module.padding) for p in (pad, pad)])
    plain = torch_class(n, False)(c, module.out_channels, module.kernel_size, module.stride, 0,
                                  module.dilation, module.groups, device=device, dtype=DTYPE)
    plain.load_state_dict(reference.state_dict())
    for d in range(n):
        with torch.no_grad():
            module.conv_offset.bias.zero_()
            module.conv_offset.bias[k * n:].view(k, n)[:, d] = 1.0  # group 1, every kernel point, dim d
        expected = plain(shifted(padded, 2 + d, slice(c // 2, c)))
        torch.testing.assert_close(module(x), expected, **TOL)


@pytest.mark.parametrize("n", DIMS)
def test_constant_integer_offset_shifts_the_transposed_output(device, n):
    """Transposed: offsets live on the input grid and move where each input point is scattered, so
    an offset of +1 along d shifts the (uncropped) output of conv_transpose by one along d."""
    args, size = case_args(n, True, bias=False)
    args.update(padding=0, output_padding=0)
    module = module_class(n, True, True)(**args, device=device, dtype=DTYPE)
    reference = torch_class(n, True)(**args, device=device, dtype=DTYPE)
    reference.load_state_dict({"weight": module.weight.detach()})
    x = torch.randn(2, args["in_channels"], *size, device=device, dtype=DTYPE)
    k = num_kernel_points(module)
    for d in range(n):
        with torch.no_grad():
            module.conv_offset.bias.zero_()
            module.conv_offset.bias.view(k, n)[:, d] = 1.0
        full = reference(x)
        expected = torch.zeros_like(full)
        expected.narrow(2 + d, 1, full.shape[2 + d] - 1).copy_(full.narrow(2 + d, 0, full.shape[2 + d] - 1))
        torch.testing.assert_close(module(x), expected, **TOL)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("n", DIMS)
def test_constant_mask_rescales_kernel_points(device, n, transposed):
    """A mask that is constant over the grid, ``m[g, k]``, is an ordinary convolution whose weight is
    multiplied by ``m[group of the sampled channel, k]``. Pins the mask layout (channel ``g * K + k``)
    and that mask groups split the sampled channels (input for conv, output for transposed)."""
    mg = 2
    module, reference, x = build(n, transposed, device, packed=True, deformable=False, modulated=True,
                                 mask_groups=mg, mask_activation=None)
    k = num_kernel_points(module)
    m = torch.rand(mg, k, device=device, dtype=DTYPE) + 0.5
    with torch.no_grad():
        module.conv_mask.bias.copy_(m.flatten())
    groups, cin, cout = module.groups, module.in_channels, module.out_channels
    weight = reference.weight.detach()
    # Global index of the sampled channel for every (dim0, dim1) entry of the weight.
    rows = torch.arange(weight.shape[0], device=device)[:, None]
    cols = torch.arange(weight.shape[1], device=device)[None, :]
    if transposed:  # weight (C_in, C_out / groups): sampled channel = output channel
        sampled, per_group = (rows // (cin // groups)) * (cout // groups) + cols, cout // mg
    else:  # weight (C_out, C_in / groups): sampled channel = input channel
        sampled, per_group = (rows // (cout // groups)) * (cin // groups) + cols, cin // mg
    scale = m[sampled // per_group]  # (dim0, dim1, K)
    with torch.no_grad():
        reference.weight.copy_(weight * scale.view(weight.shape))
    torch.testing.assert_close(module(x), reference(x), **TOL)


# ----------------------------------------------------------------------------------------------------------
# Packed modules


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("n", DIMS)
@pytest.mark.parametrize("mode", ["unmodulated", "sigmoid", "softmax", "raw"])
def test_packed_at_init(device, n, transposed, mode):
    """Zero generators give zero offsets and a constant mask ``a = activation(0)``; the op is linear
    in the mask, so the output is ``a * conv(x, W) + bias``: a = 1 without a mask, sigmoid(0) = 1/2,
    softmax over K equal logits = 1/K, and 0 for a raw (un-activated) mask."""
    extra = {} if mode == "unmodulated" else dict(
        modulated=True, mask_groups=2, mask_activation=None if mode == "raw" else mode)
    module, reference, x = build(n, transposed, device, packed=True, offset_groups=2, **extra)
    k = num_kernel_points(module)
    scale = {"unmodulated": 1.0, "sigmoid": 0.5, "softmax": 1.0 / k, "raw": 0.0}[mode]
    bias = module.bias.view(-1, *(1,) * n)
    expected = scale * (reference(x) - bias) + bias
    torch.testing.assert_close(module(x), expected, **TOL)
    torch.testing.assert_close(module(x[0]), expected[0], **TOL)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("n", DIMS)
def test_softmax_mask_sums_to_one_per_group(n, transposed):
    mg = 2
    args, size = case_args(n, transposed)
    module = module_class(n, transposed, True)(**args, modulated=True, mask_groups=mg,
                                               mask_activation="softmax", dtype=DTYPE)
    with torch.no_grad():
        module.conv_mask.weight.normal_()
        module.conv_mask.bias.normal_()
    x = torch.randn(2, args["in_channels"], *size, dtype=DTYPE)
    logits = module.conv_mask(x)
    mask = module.mask_activation(logits)
    k = num_kernel_points(module)
    grouped = mask.unflatten(1, (mg, k))
    assert (grouped > 0).all()
    torch.testing.assert_close(grouped.sum(2), torch.ones_like(grouped[:, :, 0]), **TOL)
    expected = torch.exp(logits.unflatten(1, (mg, k)))
    expected = expected / expected.sum(2, keepdim=True)
    torch.testing.assert_close(grouped, expected, **TOL)
    # Unbatched masks are grouped along their first dim.
    torch.testing.assert_close(module.mask_activation(logits[0]), mask[0], **TOL)


def randomize_generators(module, std=0.3):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("conv_"):
                p.normal_(0.0, std)


def generated(module, x):
    """Offset and mask computed here from the generator weights, independently of the module."""
    n = len(module.kernel_size)
    k = num_kernel_points(module)
    conv = getattr(F, f"conv{n}d")

    def run(generator):
        if module.transposed:
            return conv(x, generator.weight, generator.bias)
        return conv(x, generator.weight, generator.bias, module.stride, module.padding, module.dilation)

    offset = mask = None
    if module.conv_offset is not None:
        offset = run(module.conv_offset)
        if module.offset_activation is not None:
            offset = module.offset_activation(offset)
    if module.conv_mask is not None:
        mask = run(module.conv_mask)
        if isinstance(module.mask_activation, nn.Sigmoid):
            mask = torch.sigmoid(mask)
        elif module.mask_activation is not None:  # softmax over the K points of each group
            mask = mask.unflatten(1, (-1, k)).softmax(2).flatten(1, 2)
    return offset, mask


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("n", DIMS)
@pytest.mark.parametrize("config", ["offset_only", "sigmoid", "softmax", "tanh_offset_mask_only"])
def test_packed_matches_reference_with_random_generators(device, n, transposed, config):
    extra = dict(offset_groups=2, mask_groups=2)
    if config == "sigmoid":
        extra.update(modulated=True)
    elif config == "softmax":
        extra.update(modulated=True, mask_activation="softmax", mask_groups=1)
    elif config == "tanh_offset_mask_only":
        extra.update(modulated=True, offset_activation=nn.Tanh())
    module, _, x = build(n, transposed, device, packed=True, **extra)
    randomize_generators(module)
    offset, mask = generated(module, x)
    assert offset is not None and offset.abs().max() > 0.1
    expected = run_reference(module, x, offset, mask)
    torch.testing.assert_close(module(x), expected, **TOL)
    torch.testing.assert_close(module(x[1]), expected[1], **TOL)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("n", DIMS)
def test_backward_reaches_generators(device, n, transposed):
    module, _, x = build(n, transposed, device, packed=True, modulated=True, offset_groups=2, mask_groups=2)
    x.requires_grad_(True)
    target = torch.randn_like(module(x))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    for step in range(2):
        optimizer.zero_grad()
        loss = (module(x) - target).pow(2).sum()
        loss.backward()
        for name, p in module.named_parameters():
            assert p.grad is not None, (step, name)
            assert torch.isfinite(p.grad).all(), (step, name)
            assert p.grad.abs().max() > 0, (step, name)
        assert x.grad.abs().max() > 0
        optimizer.step()
    # After one step the generators have left zero: the layer actually deforms.
    assert module.conv_offset.weight.abs().max() > 0
    assert module.conv_mask.weight.abs().max() > 0


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("mask_activation", ["sigmoid", "softmax"])
def test_packed_gradcheck(device, transposed, mask_activation):
    """Finite differences through generator, activation and op (random, non-integer offsets)."""
    args = dict(in_channels=4, out_channels=4, kernel_size=(2, 2), stride=(1, 2), padding=(1, 0), groups=2)
    if transposed:
        args["output_padding"] = (0, 1)
    module = module_class(2, transposed, True)(**args, offset_groups=2, mask_groups=2, modulated=True,
                                               mask_activation=mask_activation, device=device, dtype=DTYPE)
    randomize_generators(module, std=0.2)
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in module.named_parameters()]
    x = torch.randn(2, 4, 3, 4, device=device, dtype=DTYPE, requires_grad=True)

    def fn(x, *values):
        return torch.func.functional_call(module, dict(zip(names, values)), (x,))

    # fast_mode compares random projections of the Jacobian: still finite differences, far cheaper.
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
