"""Every op's outputs own their memory (no view of an internal buffer), so an in-place op after any
op or layer (``ReLU(inplace=True)``, ``x += 1``) trains: autograd forbids changing a custom op's
view outputs in place. Checked on every layout, dtype and kernel (C++ on the CPU, the Triton drivers
under the interpreter), and the gradients after the in-place op equal those of its out-of-place twin.
"""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRETER, INTERPRETER_PARAM, INTERPRETER_SKIP_REASON, triton_kernels_on_cpu
from extras import require
from torch import nn

from dcn_plugin import ops

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


TRITON = pytest.param("triton", marks=INTERPRETER_PARAM.marks)


@pytest.fixture(params=["cpp", TRITON])
def kernels(request):
    if request.param == "triton" and not INTERPRETER:
        pytest.skip(INTERPRETER_SKIP_REASON)
    """``cpp``: the C++ kernels; ``triton``: the Triton kernels on CPU tensors, under the interpreter."""
    if request.param == "triton":
        with triton_kernels_on_cpu():
            yield "triton"
    else:
        yield "cpp"


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if t.dim() in formats:
        return t.contiguous(memory_format=formats[t.dim()])
    return t.transpose(1, 2).contiguous().transpose(1, 2)  # 1d: channels innermost


def _conv_case(n: int, transposed: bool, layout: str, dtype: torch.dtype):
    """Leaf tensors of a small deformable convolution with offset, mask and bias."""
    g = torch.Generator().manual_seed(n * 10 + transposed)
    size, k = (6,) * n, (3,) * n
    kernel_points = 3 ** n
    grid = size  # where offset and mask live: the output (padding 1) or, transposed, the input

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = leaf(2, 4, *size)
    w = leaf(4, 3, *k) if transposed else leaf(3, 4, *k)
    off = leaf(2, n * kernel_points, *grid, scale=0.5)
    mask = torch.rand(2, kernel_points, *grid, generator=g).to(dtype)
    bias = leaf(3)
    if layout == "channels_last":
        x = _channels_last(x)
    return [t.requires_grad_() for t in (x, w, off, mask, bias)]


def _forward_backward(fn, leaves, in_place: bool):
    out = fn(*leaves)
    assert out._base is None, "the op's output is a view"
    out = out.relu_() if in_place else out.relu()
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    return out.detach(), grads


# The interpreter is slow: there, 3d and float16 are left out (they run the driver code of 2d and bfloat16).
CONV_CASES = [
    pytest.param(k, n, transposed, layout, dtype, id=f"{k}-{n}d{'-t' if transposed else ''}-{layout}-{dtype}")
    for k in ("cpp", "triton") for n, transposed in [(1, False), (2, False), (3, False), (2, True)]
    for layout in ("contiguous", "channels_last") for dtype in DTYPES
    if k == "cpp" or (n < 3 and dtype != torch.float16)
]


@pytest.mark.parametrize("kernels,n,transposed,layout,dtype", CONV_CASES, indirect=["kernels"])
def test_deform_conv_outputs_own_memory(kernels, n, transposed, layout, dtype):
    leaves = _conv_case(n, transposed, layout, dtype)

    def op(x, w, off, mask, bias):
        return ops.deform_conv(x, w, off, mask, bias, padding=1, transposed=transposed)

    expected, expected_grads = _forward_backward(op, leaves, in_place=False)
    out, grads = _forward_backward(op, leaves, in_place=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for g, e in zip(grads, expected_grads):
        assert g._base is None
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("psroi", [False, True], ids=["roi", "psroi"])
def test_roi_pool_outputs_own_memory(kernels, psroi, dtype):
    g = torch.Generator().manual_seed(3)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 7.0], [1, 0.0, 2.0, 5.0, 11.0]], dtype=dtype)
    if psroi:
        x = torch.randn(2, 2 * 9, 12, 12, generator=g).to(dtype).requires_grad_()
        off = (torch.randn(2, 2, 3, 3, generator=g) * 0.3).to(dtype).requires_grad_()

        def op(x, off):
            return ops.deform_psroi_pool(x, rois, off, 1.0, output_dim=2, group_size=3, pooled_size=3,
                                         sample_per_part=2, trans_std=0.1)
    else:
        x = torch.randn(2, 3, 12, 12, generator=g).to(dtype).requires_grad_()
        off = (torch.randn(2, 2, 3, 3, generator=g) * 0.3).to(dtype).requires_grad_()

        def op(x, off):
            return ops.deform_roi_pool(x, rois, off, (3, 3), 1.0, 2)

    expected, expected_grads = _forward_backward(op, [x, off], in_place=False)
    out, grads = _forward_backward(op, [x, off], in_place=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for grad, e in zip(grads, expected_grads):
        assert grad._base is None
        torch.testing.assert_close(grad, e, rtol=0, atol=0)


def _layers():
    """(name, builder of the layer, input shape) for every op module and DCN layer."""
    cases = [
        ("DeformConv1d", lambda: ops.DeformConv1d(4, 6, 3, padding=1), (2, 4, 7)),
        ("DeformConv2d", lambda: ops.DeformConv2d(4, 6, 3, padding=1), (2, 4, 7, 7)),
        ("DeformConv3d", lambda: ops.DeformConv3d(4, 6, 3, padding=1), (1, 4, 5, 5, 5)),
        ("DeformConvTranspose2d", lambda: ops.DeformConvTranspose2d(4, 6, 3, stride=2), (2, 4, 5, 5)),
        ("PackedDeformConv2d", lambda: ops.PackedDeformConv2d(4, 6, 3, padding=1, modulated=True),
         (2, 4, 7, 7)),
        ("PackedDeformConvTranspose2d", lambda: ops.PackedDeformConvTranspose2d(4, 6, 3, stride=2),
         (2, 4, 5, 5)),
    ]
    try:
        from dcn_plugin import layers
    except ImportError:
        return cases
    cases += [
        ("DCN", lambda: layers.DCN(4, 6, 3, padding=1), (2, 4, 7, 7)),
        ("DCNv2", lambda: layers.DCNv2(4, 6, 3, padding=1), (2, 4, 7, 7)),
        ("DCNv3", lambda: layers.DCNv3(4, 6, 3, padding=1), (2, 4, 7, 7)),
        ("DCN1d", lambda: layers.DCN1d(4, 6, 3, padding=1, modulated=True), (2, 4, 7)),
        ("DCN3d", lambda: layers.DCN3d(4, 6, 3, padding=1), (1, 4, 5, 5, 5)),
        ("DCNTranspose1d", lambda: layers.DCNTranspose1d(4, 6, 3, stride=2), (2, 4, 5)),
        ("DCNTranspose2d", lambda: layers.DCNTranspose2d(4, 6, 3, stride=2, modulated=True), (2, 4, 5, 5)),
        ("DCNTranspose3d", lambda: layers.DCNTranspose3d(4, 6, 3, stride=2), (1, 4, 3, 3, 3)),
    ]
    return cases


LAYERS = _layers()


class _Then(nn.Module):
    """``layer``, then an in-place add on its output and an in-place ReLU (or their out-of-place twins)."""

    def __init__(self, layer: nn.Module, in_place: bool) -> None:
        super().__init__()
        self.layer, self.in_place = layer, in_place
        self.act = nn.ReLU(inplace=in_place)

    def forward(self, x):
        y = self.layer(x)
        if self.in_place:
            y += 0.1
        else:
            y = y + 0.1
        return self.act(y)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,build,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_in_place_ops_after_every_layer_train(name, build, shape, layout):
    torch.manual_seed(0)
    layer = build().double()
    with torch.no_grad():  # non-zero generators, so that offsets and masks take part
        for p in layer.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(*shape, dtype=torch.float64)
    if layout == "channels_last":
        x = _channels_last(x)
    results = []
    for in_place in (False, True):
        model = _Then(layer, in_place)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (expected, expected_grads), (out, grads) = results
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("conv_type", ["DCN", "DCNv2"])
def test_conv_module_dcn_no_norm_in_place_relu_trains(conv_type, layout):
    """mmcv's ``ConvModule(conv_cfg=dict(type='DCN'), norm_cfg=None)``: its default activation is
    ``ReLU(inplace=True)``, applied straight to the deformable layer's output."""
    require("mmengine", "mmcv.cnn")
    from mmcv.cnn import ConvModule

    import dcn_plugin  # noqa: F401  (registers the layers)

    torch.manual_seed(0)
    module = ConvModule(4, 6, 3, padding=1, conv_cfg=dict(type=conv_type), norm_cfg=None)
    assert isinstance(module.activate, nn.ReLU) and module.activate.inplace
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.randn(2, 4, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randn(2, 6, 8, 8)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = (module(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
