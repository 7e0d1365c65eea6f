"""The op as PyTorch sees it: ``opcheck`` (schema, fake kernel, autograd registration, AOT
dispatch), ``torch.compile(fullgraph=True)``, ``torch.export``, double backward, autocast."""

from __future__ import annotations

import math

import pytest
import torch
from reference import Case, make_tensors, relative_error, run_op, run_reference
from torch import nn

from dcn_plugin import ops

# ------------------------------------------------------------------------------------------------
# opcheck


OPCHECK_CASES = {
    "2d": Case.build(2, batch=2, in_channels=4, out_channels=2, in_size=(4, 3), kernel=(2, 3), padding=1,
                     groups=2, offset_groups=2, mask_groups=1),
    "2d-transposed": Case.build(2, transposed=True, batch=1, in_channels=2, out_channels=4, in_size=3,
                                kernel=(3, 2), stride=2, padding=1, output_padding=1, offset_groups=1,
                                mask_groups=2),
    "1d-no-offset-no-mask": Case.build(1, batch=2, in_channels=2, out_channels=3, in_size=6, kernel=3,
                                       stride=2, offset_groups=0, mask_groups=0),
    "3d-no-mask": Case.build(3, batch=1, in_channels=2, out_channels=2, in_size=3, kernel=2, padding=0,
                             offset_groups=1, mask_groups=0, bias=False),
    "3d-transposed-no-offset": Case.build(3, transposed=True, batch=1, in_channels=2, out_channels=2,
                                          in_size=2, kernel=2, dilation=2, padding=0, offset_groups=0,
                                          mask_groups=1),
}


def _op_args(case: Case, tensors):
    return (tensors["input"], tensors["weight"], tensors["offset"], tensors["mask"], tensors["bias"],
            list(case.stride), list(case.padding), list(case.dilation), case.transposed,
            list(case.output_padding), case.groups)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("case", list(OPCHECK_CASES.values()), ids=list(OPCHECK_CASES))
def test_opcheck_forward(device, case, requires_grad):
    tensors = make_tensors(case, device=device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.dcn_plugin.deform_conv.default, _op_args(case, tensors))


@pytest.mark.parametrize("output_mask", [[True] * 4, [True, False, False, False], [False, True, True, False],
                                         [False, False, False, True]], ids=["all", "input", "weight-offset",
                                                                            "mask"])
@pytest.mark.parametrize("case", list(OPCHECK_CASES.values()), ids=list(OPCHECK_CASES))
def test_opcheck_backward(device, case, output_mask):
    tensors = make_tensors(case, device=device)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64,
                              device=device)
    args = _op_args(case, tensors)
    args = (grad_output, *args[:4], *args[5:], output_mask)
    torch.library.opcheck(torch.ops.dcn_plugin.deform_conv_backward.default, args)


# ------------------------------------------------------------------------------------------------
# A small deformable layer, as a user writes one.


@pytest.mark.parametrize("which", ["input", "weight"])
@pytest.mark.parametrize("name", ["2d", "2d-transposed", "3d-no-mask"])
def test_opcheck_channels_last(device, name, which):
    """The fake kernels promise the layouts the kernels give: channels-last in, channels-last out."""
    case = OPCHECK_CASES[name]
    tensors = make_tensors(case, device=device, requires_grad=True)
    memory_format = torch.channels_last if case.n == 2 else torch.channels_last_3d
    for key in ("input", "offset", "mask") if which == "input" else ("weight",):
        if tensors[key] is not None:
            tensors[key] = tensors[key].detach().to(memory_format=memory_format).requires_grad_(True)
    torch.library.opcheck(torch.ops.dcn_plugin.deform_conv.default, _op_args(case, tensors))
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64,
                              device=device).to(memory_format=memory_format)
    args = _op_args(case, {k: None if t is None else t.detach() for k, t in tensors.items()})
    args = (grad_output, *args[:4], *args[5:], [True] * 4)
    torch.library.opcheck(torch.ops.dcn_plugin.deform_conv_backward.default, args)


class DeformLayer(nn.Module):
    """Offsets and a sigmoid mask from a plain conv, then the deformable (transposed) conv."""

    def __init__(self, n: int, transposed: bool, channels: int = 4, kernel: int = 3, offset_groups: int = 2):
        super().__init__()
        self.n, self.transposed = n, transposed
        self.num_kernel = kernel**n
        self.offset_channels = offset_groups * n * self.num_kernel
        conv = getattr(nn, f"Conv{n}d")
        self.conv_offset = conv(channels, self.offset_channels + self.num_kernel, 3, padding=1)
        nn.init.normal_(self.conv_offset.weight, std=0.3)
        shape = (channels, channels, *(kernel,) * n)
        self.weight = nn.Parameter(torch.randn(shape) / math.sqrt(channels * self.num_kernel))
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        offset_mask = self.conv_offset(x)
        offset = offset_mask[:, : self.offset_channels]
        mask = torch.sigmoid(offset_mask[:, self.offset_channels:])
        if self.transposed:
            fn = getattr(ops, f"deform_conv_transpose{self.n}d")
            return fn(x, self.weight, offset, mask, self.bias, stride=2, padding=1, output_padding=1)
        fn = getattr(ops, f"deform_conv{self.n}d")
        return torch.relu(fn(x, self.weight, offset, mask, self.bias, padding=1))


def _input(n: int, device: str, batch: int = 2, size: int = 6) -> torch.Tensor:
    return torch.randn(batch, 4, *(size,) * n, device=device)


def _forward_backward(module: nn.Module, fn, x: torch.Tensor):
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in module.named_parameters()}


def _assert_same(actual, expected):
    (out, grad_x, grads), (out_e, grad_x_e, grads_e) = actual, expected
    torch.testing.assert_close(out, out_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_x, grad_x_e, atol=1e-4, rtol=1e-4)
    for name in grads_e:
        torch.testing.assert_close(grads[name], grads_e[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("n, transposed", [(2, False), (3, True)], ids=["2d", "3d-transposed"])
def test_compile_fullgraph(device, n, transposed):
    torch.manual_seed(0)
    module = DeformLayer(n, transposed).to(device)
    compiled = torch.compile(module, fullgraph=True)
    sizes = [(2, 6), (3, 5)] if n == 2 else [(2, 4)]  # a second shape: recompiled with dynamic shapes
    for batch, size in sizes:
        x = _input(n, device, batch, size)
        _assert_same(_forward_backward(module, compiled, x), _forward_backward(module, module, x))


def test_compile_fullgraph_functional(device):
    """The functional op alone, compiled with the eager backend (quick), over several configs."""
    for case in OPCHECK_CASES.values():
        tensors = make_tensors(case, device=device)

        def fn(input, weight, offset, mask, bias, case=case):
            if case.transposed:
                op = getattr(ops, f"deform_conv_transpose{case.n}d")
                return op(input, weight, offset, mask, bias, case.stride, case.padding, case.output_padding,
                          case.dilation, case.groups)
            op = getattr(ops, f"deform_conv{case.n}d")
            return op(input, weight, offset, mask, bias, case.stride, case.padding, case.dilation,
                      case.groups)

        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        args = [tensors[k] for k in ("input", "weight", "offset", "mask", "bias")]
        torch.testing.assert_close(compiled(*args), fn(*args))


@pytest.mark.parametrize("n, transposed", [(2, False), (1, True), (3, False)],
                         ids=["2d", "1d-transposed", "3d"])
def test_export(device, n, transposed):
    torch.manual_seed(0)
    module = DeformLayer(n, transposed).to(device).eval()
    x = _input(n, device, size=5)
    exported = torch.export.export(module, (x,))
    assert "dcn_plugin.deform_conv" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), module(x))
    other = _input(n, device, size=5)
    torch.testing.assert_close(exported.module()(other), module(other))


# ------------------------------------------------------------------------------------------------
# Double backward, autocast.


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_double_backward_raises(device, transposed):
    case = Case.build(2, transposed=transposed, batch=1, in_channels=2, out_channels=2, in_size=4,
                      stride=2 if transposed else 1, output_padding=1 if transposed else 0)
    tensors = make_tensors(case, device=device, requires_grad=True)
    out = run_op(case, tensors)
    (grad_input,) = torch.autograd.grad(out.pow(2).sum(), tensors["input"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_input.sum().backward()


def _autocast_dtypes(device):
    return [torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_autocast(device, transposed):
    case = Case.build(2, transposed=transposed, batch=2, in_channels=8, out_channels=8, in_size=6,
                      stride=2 if transposed else 1, output_padding=1 if transposed else 0, offset_groups=2,
                      mask_groups=2)
    tensors = make_tensors(case, dtype=torch.float32, device=device, requires_grad=True)
    expected = run_reference(case, {k: v.detach().cpu().double() for k, v in tensors.items()})
    for dtype in _autocast_dtypes(device):
        with torch.autocast(device, dtype=dtype):
            out = run_op(case, tensors)
        assert out.dtype == dtype
        assert relative_error(out, expected) < 8 * torch.finfo(dtype).eps
        out.float().sum().backward()
        for name, t in tensors.items():
            assert t.grad is not None and t.grad.dtype == torch.float32, name
            t.grad = None


def test_autocast_dtype_like_conv(device):
    """Under autocast the op gives the dtype that conv2d gives."""
    case = Case.build(2, batch=1, in_channels=2, out_channels=2, in_size=4)
    tensors = make_tensors(case, dtype=torch.float32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = run_op(case, tensors)
        conv = torch.nn.functional.conv2d(tensors["input"], tensors["weight"], tensors["bias"], padding=1)
    assert out.dtype == conv.dtype == torch.bfloat16
