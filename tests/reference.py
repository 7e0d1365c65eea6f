"""A slow, obviously-correct pure-PyTorch N-d deformable convolution: the oracle of the op tests.

Written from the definition, one step at a time, with no tricks:

1. the sampling position of every (grid point ``p``, kernel point ``k``) pair along every dim ``d``
   is ``p_d * stride_d - padding_d + k_d * dilation_d + offset_d`` (kernel points in row-major order,
   offset channel ``(og * K + k) * N + d``);
2. forward: the input is read at that position by N-linear interpolation, summing the ``2^N``
   corners ``floor(pos) + bit`` with weights ``prod_d (frac_d if bit_d else 1 - frac_d)``, a corner
   outside the input reading zero (torchvision's ``bilinear_interpolate``); the samples are
   multiplied by the mask (channel ``mg * K + k``) and contracted with the weight by ``einsum``;
3. transposed: the weight is applied first (``einsum`` over the input channels of the group), the
   mask multiplies the result, and every value is *scattered* onto the output canvas at its
   sampling position with the same corner weights (corners outside the canvas are dropped).

Every step is an autograd-differentiable PyTorch op, so the gradients of these functions are an
oracle too. The transposed op is written as an explicit scatter, independently of the forward, so
that the adjoint identity between the two is a real check of both (see ``test_ops_reference.py``).

The bottom of this file builds random test cases (:class:`Case`) shared by the op tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from dcn_plugin.ops.shapes import DeformConvShape

IntOrTuple = Union[int, Sequence[int]]

__all__ = [
    "deform_conv_reference",
    "deform_conv_transpose_reference",
    "Case",
    "random_offset",
    "make_tensors",
    "run_reference",
    "run_op",
    "reference_conv",
    "forward_backward",
    "relative_error",
    "assert_low_precision_like_conv",
]


def _ntuple(value: IntOrTuple, n: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * n
    assert len(value) == n, f"expected {n} values, got {value}"
    return value


def _sampling_positions(
    grid: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    offset: Optional[Tensor],
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
) -> List[Tensor]:
    """Sampling positions along each dim, each of shape ``(B, offset_groups, K, *grid)``."""
    n = len(grid)
    num_kernel = math.prod(kernel)
    kernel_index = torch.meshgrid(*[torch.arange(k, device=device) for k in kernel], indexing="ij")
    grid_index = torch.meshgrid(*[torch.arange(g, device=device) for g in grid], indexing="ij")
    ones = [1] * n
    positions = []
    for d in range(n):
        k_d = kernel_index[d].reshape(num_kernel, *ones).to(dtype)  # row-major kernel points
        p_d = grid_index[d].reshape(1, *grid).to(dtype)
        base = p_d * stride[d] - padding[d] + k_d * dilation[d]  # (K, *grid)
        positions.append(base.expand(batch, 1, num_kernel, *grid))
    if offset is None:
        return positions
    offset_groups = offset.shape[1] // (n * num_kernel)
    assert offset.shape == (batch, offset_groups * n * num_kernel, *grid), offset.shape
    offset = offset.reshape(batch, offset_groups, num_kernel, n, *grid)  # channel (og * K + k) * N + d
    return [positions[d] + offset[:, :, :, d] for d in range(n)]


def _per_channel(t: Tensor, channels: int) -> Tensor:
    """``(B, G, ...) -> (B, channels, ...)``: channel ``c`` takes group ``c // (channels / G)``."""
    groups = t.shape[1]
    assert channels % groups == 0, f"{groups} groups do not divide {channels} channels"
    return t.repeat_interleave(channels // groups, dim=1)


def _corners(positions: List[Tensor], size: Sequence[int]):
    """Yields ``(flat_index, corner_weight, inside)`` for the ``2^N`` corners of every position.

    ``flat_index`` is clamped into range (so it can be used for gather/scatter); ``inside`` says
    whether the corner really lies in the ``size`` box; corners outside must contribute zero.
    """
    low = [p.detach().floor() for p in positions]  # piecewise constant: no gradient
    frac = [p - f for p, f in zip(positions, low)]
    low = [f.long() for f in low]
    for bits in itertools.product((0, 1), repeat=len(size)):
        flat_index = torch.zeros_like(low[0])
        weight = torch.ones_like(frac[0])
        inside = torch.ones_like(low[0], dtype=torch.bool)
        for d, bit in enumerate(bits):
            index = low[d] + bit
            inside = inside & (index >= 0) & (index < size[d])
            weight = weight * (frac[d] if bit else 1 - frac[d])
            flat_index = flat_index * size[d] + index.clamp(0, size[d] - 1)
        yield flat_index, weight, inside


def _interpolate(input: Tensor, positions: List[Tensor]) -> Tensor:
    """N-linear interpolation of ``input (B, C, *size)`` at ``positions`` (each ``(B, C, *rest)``)."""
    batch, channels = input.shape[:2]
    flat = input.reshape(batch, channels, math.prod(input.shape[2:]))
    num_samples = math.prod(positions[0].shape[2:])
    result = torch.zeros(positions[0].shape, dtype=input.dtype, device=input.device)
    for flat_index, weight, inside in _corners(positions, input.shape[2:]):
        value = flat.gather(2, flat_index.reshape(batch, channels, num_samples)).reshape(flat_index.shape)
        result = result + torch.where(inside, value * weight, torch.zeros_like(value))
    return result


def _scatter(values: Tensor, positions: List[Tensor], size: Sequence[int]) -> Tensor:
    """Adjoint of :func:`_interpolate`: adds ``values (B, C, *rest)`` at ``positions`` onto a
    zero canvas ``(B, C, *size)`` with the same corner weights."""
    batch, channels = values.shape[:2]
    canvas = torch.zeros(batch, channels, math.prod(size), dtype=values.dtype, device=values.device)
    num_values = math.prod(values.shape[2:])
    for flat_index, weight, inside in _corners(positions, size):
        contribution = torch.where(inside, values * weight, torch.zeros_like(values))
        index = flat_index.reshape(batch, channels, num_values)
        canvas = canvas.scatter_add(2, index, contribution.reshape(batch, channels, num_values))
    return canvas.reshape(batch, channels, *size)


def _mask_per_channel(mask: Optional[Tensor], channels: int, num_kernel: int, grid: Sequence[int]):
    if mask is None:
        return None
    batch = mask.shape[0]
    mask_groups = mask.shape[1] // num_kernel
    assert mask.shape == (batch, mask_groups * num_kernel, *grid), mask.shape
    return _per_channel(mask.reshape(batch, mask_groups, num_kernel, *grid), channels)  # (B, C, K, *grid)


def deform_conv_reference(
    input: Tensor,
    weight: Tensor,
    offset: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
) -> Tensor:
    """Deformable convolution, N = ``weight.dim() - 2``; batched input ``(B, C_in, *in)`` only.

    ``weight (C_out, C_in / groups, *k)``, ``offset (B, og * N * K, *out)``, ``mask (B, mg * K, *out)``.
    """
    n = weight.dim() - 2
    stride, padding, dilation = _ntuple(stride, n), _ntuple(padding, n), _ntuple(dilation, n)
    batch, in_channels, *in_size = input.shape
    out_channels, group_in_channels, *kernel = weight.shape
    assert input.dim() == n + 2 and in_channels == group_in_channels * groups
    out_size = [
        (in_size[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(n)
    ]
    num_kernel = math.prod(kernel)

    positions = _sampling_positions(
        out_size, kernel, stride, padding, dilation, offset, batch, input.dtype, input.device
    )
    positions = [_per_channel(p, in_channels) for p in positions]  # (B, C_in, K, *out)
    samples = _interpolate(input, positions)  # (B, C_in, K, *out)
    mask = _mask_per_channel(mask, in_channels, num_kernel, out_size)
    if mask is not None:
        samples = samples * mask

    columns = samples.reshape(batch, groups, group_in_channels, num_kernel, math.prod(out_size))
    w = weight.reshape(groups, out_channels // groups, group_in_channels, num_kernel)
    out = torch.einsum("goik,bgikp->bgop", w, columns).reshape(batch, out_channels, *out_size)
    if bias is not None:
        out = out + bias.reshape(1, out_channels, *[1] * n)
    return out


def deform_conv_transpose_reference(
    input: Tensor,
    weight: Tensor,
    offset: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
) -> Tensor:
    """Transposed deformable convolution; batched input ``(B, C_in, *in)`` only.

    ``weight (C_in, C_out / groups, *k)``, ``offset (B, og * N * K, *in)``, ``mask (B, mg * K, *in)``
    (on the input grid; the groups divide ``C_out``). Each input point ``p`` sends, for every kernel
    point ``k``, ``mask * sum_i weight[i, c, k] * input[i, p]`` to output channel ``c`` at position
    ``p * stride - padding + k * dilation + offset``, spread over the 2^N corners.
    """
    n = weight.dim() - 2
    stride, padding, dilation = _ntuple(stride, n), _ntuple(padding, n), _ntuple(dilation, n)
    output_padding = _ntuple(output_padding, n)
    batch, in_channels, *in_size = input.shape
    weight_in_channels, group_out_channels, *kernel = weight.shape
    assert input.dim() == n + 2 and in_channels == weight_in_channels and in_channels % groups == 0
    out_channels = group_out_channels * groups
    out_size = [
        (in_size[d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (kernel[d] - 1) + output_padding[d] + 1
        for d in range(n)
    ]
    num_kernel = math.prod(kernel)

    x = input.reshape(batch, groups, in_channels // groups, math.prod(in_size))
    w = weight.reshape(groups, in_channels // groups, group_out_channels, num_kernel)
    values = torch.einsum("giok,bgip->bgokp", w, x).reshape(batch, out_channels, num_kernel, *in_size)
    mask = _mask_per_channel(mask, out_channels, num_kernel, in_size)
    if mask is not None:
        values = values * mask

    positions = _sampling_positions(
        in_size, kernel, stride, padding, dilation, offset, batch, input.dtype, input.device
    )
    positions = [_per_channel(p, out_channels) for p in positions]  # (B, C_out, K, *in)
    out = _scatter(values, positions, out_size)
    if bias is not None:
        out = out + bias.reshape(1, out_channels, *[1] * n)
    return out


# ------------------------------------------------------------------------------------------------
# Test cases shared by the op tests.


@dataclasses.dataclass(frozen=True)
class Case(DeformConvShape):
    """A configuration of the op (``dcn_plugin.ops.shapes.DeformConvShape``) and whether it has a bias."""

    bias: bool = True


def random_offset(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Offsets in [-1.9, 1.9] whose fractional part is in [0.1, 0.9]: added to integer base
    positions they never land near an integer, where interpolation is not differentiable."""
    whole = torch.randint(-2, 2, tuple(shape), generator=generator).double()
    return whole + torch.rand(tuple(shape), generator=generator, dtype=torch.float64) * 0.8 + 0.1


def make_tensors(
    case: Case,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    requires_grad: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """Random ``input``, ``weight``, ``offset``, ``mask``, ``bias`` for ``case`` (absent ones None).

    Drawn in float64 on the CPU from ``seed``, then converted, so every dtype and device sees
    the same values (up to rounding).
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    tensors: Dict[str, Optional[Tensor]] = {
        "input": torch.randn(case.batch, case.in_channels, *case.in_size, generator=g, dtype=f64),
        "weight": torch.randn(*case.weight_shape, generator=g, dtype=f64) / math.sqrt(case.kernel_points),
        "offset": None,
        "mask": None,
        "bias": torch.randn(case.out_channels, generator=g, dtype=f64) if case.bias else None,
    }
    if case.offset_groups:
        tensors["offset"] = random_offset(case.offset_shape, g)
    if case.mask_groups:
        tensors["mask"] = torch.rand(*case.mask_shape, generator=g, dtype=f64) * 1.5 - 0.25
    for name, t in tensors.items():
        if t is not None:
            t = t.to(device=device, dtype=dtype)
            tensors[name] = t.requires_grad_(requires_grad)
    return tensors


ARGUMENTS = ("input", "weight", "offset", "mask", "bias")


def _arguments(tensors: Dict[str, Optional[Tensor]]) -> List[Optional[Tensor]]:
    return [tensors[name] for name in ARGUMENTS]


def run_reference(case: Case, tensors: Dict[str, Optional[Tensor]]) -> Tensor:
    """The reference on ``tensors`` (whatever their dtype: pass float64 for an oracle)."""
    if case.transposed:
        return deform_conv_transpose_reference(
            *_arguments(tensors), case.stride, case.padding, case.output_padding, case.dilation, case.groups
        )
    return deform_conv_reference(*_arguments(tensors), case.stride, case.padding, case.dilation, case.groups)


def run_op(case: Case, tensors: Dict[str, Optional[Tensor]]) -> Tensor:
    """The compiled op through the public functional API (``deform_conv{N}d`` and friends)."""
    from dcn_plugin import ops

    if case.transposed:
        fn = getattr(ops, f"deform_conv_transpose{case.n}d")
        return fn(*_arguments(tensors), case.stride, case.padding, case.output_padding, case.dilation,
                  case.groups)
    fn = getattr(ops, f"deform_conv{case.n}d")
    return fn(*_arguments(tensors), case.stride, case.padding, case.dilation, case.groups)


def reference_conv(case: Case, tensors: Dict[str, Optional[Tensor]]) -> Tensor:
    """``F.conv{N}d`` / ``F.conv_transpose{N}d`` on the same input, weight and bias (no offset, mask)."""
    import torch.nn.functional as F

    x, w, b = tensors["input"], tensors["weight"], tensors["bias"]
    if case.transposed:
        fn = getattr(F, f"conv_transpose{case.n}d")
        return fn(x, w, b, case.stride, case.padding, case.output_padding, case.groups, case.dilation)
    fn = getattr(F, f"conv{case.n}d")
    return fn(x, w, b, case.stride, case.padding, case.dilation, case.groups)


def forward_backward(
    run, case: Case, tensors: Dict[str, Optional[Tensor]], seed: int = 1
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``run(case, leaves)`` on fresh leaf copies of ``tensors`` that require grad, then backward of
    a random ``grad_output`` (drawn in float64 from ``seed``); returns the output and the gradient
    of every tensor that is present."""
    leaves = {
        name: None if t is None else t.detach().clone().requires_grad_(True) for name, t in tensors.items()
    }
    out = run(case, leaves)
    g = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    out.backward(grad_output)
    grads = {name: t.grad for name, t in leaves.items() if t is not None}
    return out.detach(), grads


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (0 for two empty tensors)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if expected.numel() == 0:
        return 0.0
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _cpu64(tensors: Dict[str, Optional[Tensor]]) -> Dict[str, Optional[Tensor]]:
    return {k: None if t is None else t.detach().cpu().double() for k, t in tensors.items()}


def _low_precision_errors(run, case: Case, dtype: torch.dtype, device: Union[str, torch.device]):
    """Relative errors vs float64 of ``run`` (the op, by default through :func:`run_op`) and of plain
    convolution in ``dtype``: ``{"output" | "input" | "weight": (op error, conv error)}``, the
    last two for the gradients. Offset, mask and bias gradients, which have no conv counterpart,
    are asserted to stay within 50 eps of the dtype.

    Both see the same (rounded) values; the float64 oracles are the reference and ``F.conv*``.
    """
    low = {k: None if t is None else t.to(dtype) for k, t in make_tensors(case, device=device).items()}
    exact = _cpu64(low)
    out, grads = forward_backward(run, case, low)
    expected, expected_grads = forward_backward(run_reference, case, exact)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    no_deform = {**low, "offset": None, "mask": None}
    conv, conv_grads = forward_backward(reference_conv, case, no_deform)
    conv_expected, conv_expected_grads = forward_backward(reference_conv, case, _cpu64(no_deform))
    errors = {"output": (relative_error(out, expected), relative_error(conv, conv_expected))}
    for name in ("input", "weight"):
        errors[name] = (relative_error(grads[name], expected_grads[name]),
                        relative_error(conv_grads[name], conv_expected_grads[name]))
    for name in ("offset", "mask", "bias"):
        if name in grads:
            assert torch.isfinite(grads[name]).all(), name
            # no conv counterpart: the error must stay at the dtype's scale
            assert relative_error(grads[name], expected_grads[name]) < 50 * torch.finfo(dtype).eps, name
    return errors


def assert_low_precision_like_conv(run, case: Case, dtype: torch.dtype,
                                   device: Union[str, torch.device], factor: float = 2) -> None:
    """In ``dtype`` (float16, bfloat16), ``run``'s output and input and weight gradients are at most
    ``factor`` times as far from float64 as plain convolution's in that dtype (see
    :func:`_low_precision_errors`): 2, or 3 where columns are stored in the half type (DESIGN.md)."""
    floor = torch.finfo(dtype).eps / 8  # so that a near-zero conv error cannot make this flaky
    for name, (error, conv_error) in _low_precision_errors(run, case, dtype, device).items():
        assert error <= factor * max(conv_error, floor), (
            f"{name}: relative error {error:.3g} vs {conv_error:.3g} for plain convolution in {dtype}"
        )
