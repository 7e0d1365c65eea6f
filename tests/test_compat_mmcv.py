"""``dcn_plugin.compat.mmcv``: mmcv-full's deformable API, checked against mmcv itself.

Oracles: the inputs and expected outputs and gradients that mmcv publishes in its own tests
(copied as published, source named at each), mmcv 2.1.0's signatures (hard-coded from its source,
and compared with the real ``mmcv.ops`` where it imports), and the real mmcv-full 2.1.0 on the CPU
(same state_dict, same inputs: same outputs and gradients), which runs where
``bash ../shared/tools/mmcv-full-env.sh`` has built its venv:
``../venv-mmcv-full/bin/python -m pytest tests/test_compat_mmcv.py``.
"""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
import warnings
from typing import Optional

import pytest
import torch
from torch import nn

from dcn_plugin import ops
from dcn_plugin.compat import mmcv as compat

CONV_CLASSES = ["DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2d", "ModulatedDeformConv2dPack"]
ROI_NAMES = ["DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack", "deform_roi_pool"]
MMCV_SKIP = ("needs the real mmcv-full 2.1.0 (compiled ops): build its venv with "
             "`bash ../shared/tools/mmcv-full-env.sh`, then run `../venv-mmcv-full/bin/python -m pytest "
             "tests/test_compat_mmcv.py` from the project root")


def _real_mmcv_ops():
    try:
        import mmcv.ops
        from mmcv.ops import deform_conv as deform_conv_module
        from mmcv.ops import modulated_deform_conv as modulated_module
    except Exception:  # mmcv missing, or mmcv-lite (no compiled extension)
        return None
    return mmcv.ops, deform_conv_module, modulated_module


REAL = _real_mmcv_ops()


@pytest.fixture
def mmcv_ops():
    if REAL is None:
        pytest.skip(MMCV_SKIP)
    return REAL[0]


# ------------------------------------------------------------------------------------------------
# (a) mmcv's published test values

# From mmcv's tests/test_ops/test_deform_conv.py (mmcv 2.x), copied as published.
input = [[[[1., 2., 3.], [0., 1., 2.], [3., 5., 2.]]]]
offset_weight = [[[0.1, 0.4, 0.6, 0.1]], [[0.3, 0.2, 0.1, 0.3]],
                 [[0.5, 0.5, 0.2, 0.8]], [[0.8, 0.3, 0.9, 0.1]],
                 [[0.3, 0.1, 0.2, 0.5]], [[0.3, 0.7, 0.5, 0.3]],
                 [[0.6, 0.2, 0.5, 0.3]], [[0.4, 0.1, 0.8, 0.4]]]
offset_bias = [0.7, 0.1, 0.8, 0.5, 0.6, 0.5, 0.4, 0.7]
deform_weight = [[[0.4, 0.2, 0.1, 0.9]]]

gt_out = [[[[1.650, 0.], [0.000, 0.]]]]
gt_x_grad = [[[[-0.666, 0.204, 0.000], [0.030, -0.416, 0.012],
               [0.000, 0.252, 0.129]]]]
gt_offset_weight_grad = [[[[1.44, 2.88], [0.00, 1.44]]],
                         [[[-0.72, -1.44], [0.00, -0.72]]],
                         [[[0.00, 0.00], [0.00, 0.00]]],
                         [[[0.00, 0.00], [0.00, 0.00]]],
                         [[[-0.10, -0.20], [0.00, -0.10]]],
                         [[[-0.08, -0.16], [0.00, -0.08]]],
                         [[[-0.54, -1.08], [0.00, -0.54]]],
                         [[[-0.54, -1.08], [0.00, -0.54]]]]
gt_offset_bias_grad = [1.44, -0.72, 0., 0., -0.10, -0.08, -0.54, -0.54],
gt_deform_weight_grad = [[[[3.62, 0.], [0.40, 0.18]]]]

# From mmcv's tests/test_ops/test_modulated_deform_conv.py (mmcv 2.x), copied as published.
input_t = [[[[1., 2., 3.], [1., 2., 3.], [1., 2., 3.]]]]
output_t = [[[[0.5, 1.5, 2.5, 1.5], [1.0, 3.0, 5.0, 3.0], [1.0, 3.0, 5.0, 3.0],
              [0.5, 1.5, 2.5, 1.5]]]]
input_grad = [[[[2., 2., 2.], [2., 2., 2.], [2., 2., 2.]]]]
dcn_w_grad = [[[[9., 9.], [9., 9.]]]]
dcn_offset_w_grad = [[[[-7.0, -4.0], [0.0, 0.0]]], [[[-9.0, 7.5], [-6.0,
                                                                   5.0]]],
                     [[[-4.0, -7.0], [0.0, 0.0]]],
                     [[[-7.5, -9.0], [-5.0, -6.0]]],
                     [[[-7.0, -4.0], [-7.0, -4.0]]],
                     [[[-6.0, 5.0], [-9.0, 7.5]]],
                     [[[-4.0, -7.0], [-4.0, -7.0]]],
                     [[[-5.0, -6.0], [-7.5, -9.0]]], [[[10.5, 6.0], [7.0,
                                                                     4.0]]],
                     [[[6.0, 10.5], [4.0, 7.0]]], [[[7.0, 4.0], [10.5, 6.0]]],
                     [[[4.0, 7.0], [6.0, 10.5]]]]
dcn_offset_b_grad = [
    -3.0, -1.5, -3.0, -1.5, -3.0, -1.5, -3.0, -1.5, 4.5, 4.5, 4.5, 4.5
]


def _close(actual, expected, rtol, atol=1e-8, msg=""):
    """mmcv's ``np.allclose(actual, expected, rtol)`` (its third argument is rtol; shapes broadcast),
    with ``atol``."""
    actual, expected = torch.broadcast_tensors(actual.detach().double(),
                                               torch.as_tensor(expected, dtype=torch.float64))
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (msg, actual, expected)


# dtype, rtol (mmcv's thresholds: 1e-3 for double, 1e-1 for float on CPU and half on CUDA), atol for
# values published as 0 (half types round the offset-weight products).
DTYPES = [
    pytest.param(torch.float64, 1e-3, 1e-8, id="float64"),
    pytest.param(torch.float32, 1e-3, 1e-6, id="float32"),
    pytest.param(torch.float16, 1e-1, 1e-2, id="float16"),
    pytest.param(torch.bfloat16, 1e-1, 2e-2, id="bfloat16"),
]


@pytest.mark.parametrize("im2col_step", [2, 3])
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_mmcv_published_deform_conv(dtype, rtol, atol, im2col_step):
    """mmcv's ``TestDeformconv._test_deformconv`` on the CPU, in every dtype (mmcv runs half on CUDA
    only). ``im2col_step=3`` with a batch of 10 fails mmcv's divisibility assertion; here it has no
    effect."""
    batch_size = 10
    x = torch.tensor(input, dtype=dtype).repeat(batch_size, 1, 1, 1).requires_grad_()
    model = compat.DeformConv2dPack(in_channels=1, out_channels=1, kernel_size=2, stride=1, padding=0,
                                    im2col_step=im2col_step)
    model.conv_offset.weight.data = torch.Tensor(offset_weight).reshape(8, 1, 2, 2)
    model.conv_offset.bias.data = torch.Tensor(offset_bias).reshape(8)
    model.weight.data = torch.Tensor(deform_weight).reshape(1, 1, 2, 2)
    model.type(dtype)
    out = model(x)
    out.backward(torch.ones_like(out))
    assert out.dtype == dtype
    _close(out, gt_out, rtol, atol, "out")
    _close(x.grad, gt_x_grad, rtol, atol, "x.grad")
    # the batch of 10 adds up 10 equal gradients
    _close(model.conv_offset.weight.grad / batch_size, gt_offset_weight_grad, rtol, atol, "offset weight")
    _close(model.conv_offset.bias.grad / batch_size, gt_offset_bias_grad, rtol, atol, "offset bias")
    _close(model.weight.grad / batch_size, gt_deform_weight_grad, rtol, atol, "weight")


def test_mmcv_published_deform_conv_autocast_bfloat16():
    """mmcv's amp variant (``_test_amp_deformconv``, CUDA-only there) under CPU autocast: the model
    stays float32, the offset comes out of ``conv_offset`` in bfloat16, and the input follows it."""
    x = torch.tensor(input).repeat(4, 1, 1, 1).requires_grad_()
    model = compat.DeformConv2dPack(1, 1, kernel_size=2)
    model.conv_offset.weight.data = torch.Tensor(offset_weight).reshape(8, 1, 2, 2)
    model.conv_offset.bias.data = torch.Tensor(offset_bias).reshape(8)
    model.weight.data = torch.Tensor(deform_weight).reshape(1, 1, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.backward(torch.ones_like(out))
    _close(out, gt_out, 1e-1, 2e-2, "out")
    _close(x.grad, gt_x_grad, 1e-1, 2e-2, "x.grad")
    _close(model.weight.grad / 4, gt_deform_weight_grad, 1e-1, 2e-2, "weight")


def test_mmcv_published_deform_conv_construction():
    """The end of mmcv's ``_test_deformconv``: no bias, ``bias=True`` and groups that do not divide
    the channels fail mmcv's assertions. (mmcv's layer has no ``bias`` attribute at all; ours has
    ``bias = None``, as ``nn.Conv2d(bias=False)``, and no ``bias`` key either.)"""
    model = compat.DeformConv2d(1, 1, 2, stride=1, padding=0)
    assert model.bias is None and "bias" not in model.state_dict()
    with pytest.raises(AssertionError, match="bias=True"):
        compat.DeformConv2d(1, 1, 2, stride=1, padding=0, bias=True)
    with pytest.raises(AssertionError, match="in_channels 3 cannot be divisible by groups 2"):
        compat.DeformConv2d(3, 2, 3, groups=2)
    with pytest.raises(AssertionError, match="out_channels 4 cannot be divisible by groups 3"):
        compat.DeformConv2d(3, 4, 3, groups=3)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_mmcv_published_modulated_deform_conv(dtype, rtol, atol):
    """mmcv's ``TestMdconv._test_mdconv`` (threshold 1e-2) on the CPU, in every dtype."""
    x = torch.tensor(input_t, dtype=dtype, requires_grad=True)
    dcn = compat.ModulatedDeformConv2dPack(1, 1, kernel_size=(2, 2), stride=1, padding=1, deform_groups=1,
                                           bias=False)
    dcn.weight.data.fill_(1.)
    dcn.type(dtype)
    output = dcn(x)
    output.sum().backward()
    rtol = max(rtol, 1e-2)
    _close(output, output_t, rtol, atol, "output")
    _close(x.grad, input_grad, rtol, atol, "input grad")
    _close(dcn.weight.grad, dcn_w_grad, rtol, atol, "weight grad")
    _close(dcn.conv_offset.weight.grad, dcn_offset_w_grad, rtol, atol, "offset weight grad")
    _close(dcn.conv_offset.bias.grad, dcn_offset_b_grad, rtol, atol, "offset bias grad")


# ------------------------------------------------------------------------------------------------
# (b) signatures: mmcv 2.1.0's, read from mmcv/ops/{deform_conv,modulated_deform_conv,deform_roi_pool}.py
# (the functions are autograd Functions' ``apply``: their arguments are those of ``forward`` after ctx).

MMCV_SIGNATURES = {
    "DeformConv2d": "(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, "
                    "deform_groups=1, bias=False, im2col_step=32)",
    "DeformConv2dPack": "(*args, **kwargs)",
    "ModulatedDeformConv2d": "(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, "
                             "groups=1, deform_groups=1, bias=True)",
    "ModulatedDeformConv2dPack": "(*args, **kwargs)",
    "deform_conv2d": "(input, offset, weight, stride=1, padding=0, dilation=1, groups=1, deform_groups=1, "
                     "bias=False, im2col_step=32)",
    "modulated_deform_conv2d": "(input, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, "
                               "groups=1, deform_groups=1)",
    "DeformRoIPool": "(output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1)",
    "DeformRoIPoolPack": "(output_size, output_channels, deform_fc_channels=1024, spatial_scale=1.0, "
                         "sampling_ratio=0, gamma=0.1)",
    "ModulatedDeformRoIPoolPack": "(output_size, output_channels, deform_fc_channels=1024, "
                                  "spatial_scale=1.0, sampling_ratio=0, gamma=0.1)",
    "deform_roi_pool": "(input, rois, offset, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1)",
}
MMCV_FORWARDS = {
    "DeformConv2d": "(self, x, offset)",
    "DeformConv2dPack": "(self, x)",
    "ModulatedDeformConv2d": "(self, x, offset, mask)",
    "ModulatedDeformConv2dPack": "(self, x)",
    "DeformRoIPool": "(self, input, rois, offset=None)",
    "DeformRoIPoolPack": "(self, input, rois)",
    "ModulatedDeformRoIPoolPack": "(self, input, rois)",
}


def _plain(signature: inspect.Signature, drop_first: bool = False) -> str:
    """A signature's text without annotations (names, kinds, order and defaults are what callers see)."""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(inspect.Signature(params[1:] if drop_first else params))


@pytest.mark.parametrize("name", sorted(MMCV_SIGNATURES))
def test_signatures_are_mmcvs(name):
    assert _plain(inspect.signature(getattr(compat, name))) == MMCV_SIGNATURES[name]
    if name in MMCV_FORWARDS:
        assert _plain(inspect.signature(getattr(compat, name).forward)) == MMCV_FORWARDS[name]


def _mmcv_callable_signature(name: str) -> str:
    mmcv_ops, deform_conv_module, modulated_module = REAL
    functions = {"deform_conv2d": deform_conv_module.DeformConv2dFunction,
                 "modulated_deform_conv2d": modulated_module.ModulatedDeformConv2dFunction,
                 "deform_roi_pool": mmcv_ops.deform_roi_pool.__self__}
    if name in functions:
        return _plain(inspect.signature(functions[name].forward), drop_first=True)
    return _plain(inspect.signature(getattr(mmcv_ops, name)))


@pytest.mark.parametrize("name", sorted(MMCV_SIGNATURES))
def test_signatures_equal_real_mmcv(mmcv_ops, name):
    assert _mmcv_callable_signature(name) == MMCV_SIGNATURES[name]
    if name in MMCV_FORWARDS:
        assert _plain(inspect.signature(getattr(mmcv_ops, name).forward)) == MMCV_FORWARDS[name]


def test_structure():
    """Every conv class is a ``dcn_plugin.ops.DeformConv2d`` (what the project recognises as a
    deformable layer) whose generator, where it has one, is an ``nn.Conv2d`` named ``conv_offset``;
    the RoI pooling names are ``dcn_plugin.ops``' own objects."""
    for name in CONV_CLASSES:
        layer = getattr(compat, name)(4, 4, 3, padding=1)
        assert isinstance(layer, ops.DeformConv2d), name
        if name.endswith("Pack"):
            assert type(layer.conv_offset) is nn.Conv2d and layer._version == 2
    for name in ROI_NAMES:
        assert getattr(compat, name) is getattr(ops, name)


# ------------------------------------------------------------------------------------------------
# (c) against the real mmcv-full on the CPU

# (class, constructor arguments, batch): strides, padding, dilation, groups and offset groups mixed.
CASES = [
    ("DeformConv2d", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), 2),
    ("DeformConv2d", dict(in_channels=4, out_channels=4, kernel_size=(3, 2), stride=2, padding=(1, 0),
                          dilation=(1, 2), groups=2, deform_groups=2), 3),
    ("DeformConv2dPack", dict(in_channels=4, out_channels=6, kernel_size=3, stride=(2, 1), padding=2,
                              dilation=2, deform_groups=2), 2),
    ("ModulatedDeformConv2d", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1,
                                   deform_groups=2), 2),
    ("ModulatedDeformConv2d", dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1,
                                   groups=2, bias=False), 1),
    ("ModulatedDeformConv2dPack", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1,
                                       deform_groups=2), 2),
    ("ModulatedDeformConv2dPack", dict(in_channels=4, out_channels=6, kernel_size=1, stride=2,
                                       bias=False), 3),
]
TOL = dict(rtol=1e-9, atol=1e-10)


def _state_dict_bytes(module: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return buffer


def _external_inputs(name, layer, x, generator):
    """Offset (and mask) for the layers that take them, shaped as the layer's output grid."""
    if name.endswith("Pack"):
        return ()
    k = layer.kernel_size[0] * layer.kernel_size[1]
    grid = nn.functional.conv2d(x, layer.weight.detach(), None, layer.stride, layer.padding, layer.dilation,
                                layer.groups).shape[-2:]
    offset = 2 * torch.randn(x.shape[0], 2 * layer.deform_groups * k, *grid, generator=generator,
                             dtype=x.dtype)
    if name.startswith("Modulated"):
        mask = torch.rand(x.shape[0], layer.deform_groups * k, *grid, generator=generator, dtype=x.dtype)
        return offset.requires_grad_(), mask.requires_grad_()
    return (offset.requires_grad_(),)


def _run(layer, x, extra):
    x = x.detach().clone().requires_grad_()
    extra = tuple(t.detach().clone().requires_grad_() for t in extra)
    out = layer(x, *extra)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out.detach(), [x.grad] + [t.grad for t in extra], grads


@pytest.mark.parametrize("name,kwargs,batch", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_same_as_real_mmcv(mmcv_ops, name, kwargs, batch):
    """Seeded construction gives mmcv's initial parameters; mmcv's state_dict loads strictly into ours
    and ours into mmcv's; outputs and all gradients agree in float64."""
    torch.manual_seed(0)
    theirs = getattr(mmcv_ops, name)(**kwargs)
    torch.manual_seed(0)
    ours = getattr(compat, name)(**kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), f"initial {key}"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours.load_state_dict(torch.load(_state_dict_bytes(theirs), weights_only=True), strict=True)
    theirs.load_state_dict(torch.load(_state_dict_bytes(ours), weights_only=True), strict=True)
    ours, theirs = ours.double(), theirs.double()
    x = torch.randn(batch, kwargs["in_channels"], 9, 8, generator=g, dtype=torch.float64)
    extra = _external_inputs(name, ours, x, g)
    (out, grads_in, grads), (out_e, grads_in_e, grads_e) = _run(ours, x, extra), _run(theirs, x, extra)
    assert out.abs().sum() > 0
    torch.testing.assert_close(out, out_e, **TOL)
    for i, (a, e) in enumerate(zip(grads_in, grads_in_e)):
        torch.testing.assert_close(a, e, **TOL, msg=f"gradient of input {i}")
    assert grads.keys() == grads_e.keys()
    for key in grads_e:
        torch.testing.assert_close(grads[key], grads_e[key], **TOL, msg=key)


def test_functionals_same_as_real_mmcv(mmcv_ops):
    """mmcv's positional call order, int and tuple geometry, as mmdetection's heads call them: tood's
    ``deform_conv2d(feat, offset, weight, 1, 0, 1, c, c)`` (1x1 depthwise sampling) among them."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64)
    calls = [
        ((x, 2 * torch.randn(2, 2 * 4, 7, 6, generator=g, dtype=torch.float64),
          torch.ones(4, 1, 1, 1, dtype=torch.float64), 1, 0, 1, 4, 4), "deform_conv2d"),
        ((x, torch.randn(2, 2 * 2 * 9, 4, 3, generator=g, dtype=torch.float64),
          torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64), (2, 2), (1, 1), 1, 1, 2),
         "deform_conv2d"),
        ((x, torch.randn(2, 2 * 9, 7, 6, generator=g, dtype=torch.float64),
          torch.rand(2, 9, 7, 6, generator=g, dtype=torch.float64),
          torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64),
          torch.randn(6, generator=g, dtype=torch.float64), 1, 2, 2, 2, 1), "modulated_deform_conv2d"),
    ]
    for args, name in calls:
        ours = getattr(compat, name)(*args)
        theirs = getattr(mmcv_ops, name)(*args)
        torch.testing.assert_close(ours, theirs, **TOL, msg=name)


def test_input_smaller_than_kernel_same_as_real_mmcv(mmcv_ops):
    """mmcv's ``DeformConv2d.forward`` pads an input smaller than the kernel and crops the output;
    here the op reads zeros outside the input anyway, and the output is the same."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    theirs = mmcv_ops.DeformConv2d(2, 3, 3, padding=1).double()
    ours = compat.DeformConv2d(2, 3, 3, padding=1).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    offset = torch.randn(1, 18, 2, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x, offset), theirs(x, offset), **TOL)


def test_mixed_dtypes_follow_offset_as_real_mmcv(mmcv_ops):
    """mmcv casts the input and weight to the offset's dtype (its mixed-precision rule)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 5, 5, generator=g)
    offset = torch.randn(1, 18, 5, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, generator=g)
    ours = compat.deform_conv2d(x, offset, weight, 1, 1)
    theirs = mmcv_ops.deform_conv2d(x, offset, weight, 1, 1)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_legacy_deformable_groups_as_real_mmcv(mmcv_ops):
    for name in CONV_CLASSES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs = getattr(mmcv_ops, name)(4, 4, 3, deformable_groups=2)
            ours = getattr(compat, name)(4, 4, 3, deformable_groups=2)
        assert ours.deform_groups == theirs.deform_groups == 2
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: v.shape for k, v in theirs.state_dict().items()}
        kinds = [w.category for w in caught]
        assert kinds.count(DeprecationWarning) == 2, name


@pytest.mark.parametrize("name", ["DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"])
def test_roi_pool_state_dict_as_real_mmcv(mmcv_ops, name):
    """The RoI pooling modules load each other's state_dicts strictly (mmcv runs them on CUDA only;
    their outputs are compared with mmcv's module code in tests/test_roi_pool_modules.py)."""
    args = dict(output_size=3, output_channels=4, deform_fc_channels=8)
    theirs, ours = getattr(mmcv_ops, name)(**args), getattr(compat, name)(**args)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


# ------------------------------------------------------------------------------------------------
# (d) state_dict keys and the version-1 upgrade

MMCV_KEYS = {
    "DeformConv2d": ["weight"],
    "DeformConv2dPack": ["weight", "conv_offset.weight", "conv_offset.bias"],
    "ModulatedDeformConv2d": ["weight", "bias"],
    "ModulatedDeformConv2dPack": ["weight", "bias", "conv_offset.weight", "conv_offset.bias"],
}


@pytest.mark.parametrize("name", CONV_CLASSES)
def test_state_dict_keys_are_mmcvs(name):
    layer = getattr(compat, name)(4, 8, 3, deform_groups=2)
    state = layer.state_dict()
    assert list(state) == MMCV_KEYS[name]
    if name.endswith("Pack"):
        channels = (2 if name == "DeformConv2dPack" else 3) * 2 * 9
        assert state["conv_offset.weight"].shape == (channels, 4, 3, 3)
        assert state._metadata[""]["version"] == 2
        assert not state["conv_offset.weight"].any() and not state["conv_offset.bias"].any()


def _version1_state_dict(name):
    """A version-1 checkpoint of a block whose layer ``conv2`` keeps its generator beside it
    (``conv2_offset.*``), and the layer it was saved from."""
    source = getattr(compat, name)(4, 4, 3, padding=1)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    sd = {f"conv2.{k}".replace("conv2.conv_offset", "conv2_offset"): v
          for k, v in source.state_dict().items()}
    return sd, source


@pytest.mark.parametrize("name", ["DeformConv2dPack", "ModulatedDeformConv2dPack"])
def test_version1_keys_upgraded_on_load(name):
    """The layer renames version-1 keys when its ``_load_from_state_dict`` sees them (called here as
    mmcv 1.x's loader called it, with the whole state_dict; torch's and mmengine 0.10's loaders hand
    a layer only the keys under its prefix, for mmcv's layers as for these); the renamed state_dict
    then loads strictly."""
    block = nn.Module()
    block.conv2 = getattr(compat, name)(4, 4, 3, padding=1)
    sd, source = _version1_state_dict(name)
    block.conv2._load_from_state_dict(sd, "conv2.", {"version": 1}, True, [], [], [])
    assert sorted(sd) == sorted(f"conv2.{k}" for k in source.state_dict())
    block.load_state_dict(sd, strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(block.conv2.state_dict()[key], value), key
    # Version 2 metadata: no renaming.
    sd = {"conv2_offset.weight": torch.zeros(1)}
    block.conv2._load_from_state_dict(sd, "conv2.", {"version": 2}, False, [], [], [])
    assert list(sd) == ["conv2_offset.weight"]


@pytest.mark.parametrize("name", ["DeformConv2dPack", "ModulatedDeformConv2dPack"])
def test_version1_upgrade_as_real_mmcv(mmcv_ops, name):
    for version in (None, 1, 2):
        sd_ours, _ = _version1_state_dict(name)
        sd_theirs = dict(sd_ours)
        metadata = {} if version is None else {"version": version}
        for module, sd in ((compat, sd_ours), (mmcv_ops, sd_theirs)):
            getattr(module, name)(4, 4, 3)._load_from_state_dict(sd, "conv2.", metadata, False, [], [], [])
        assert list(sd_ours) == list(sd_theirs), version


def test_init_weights_as_mmcv():
    """mmcv's ``init_weights`` re-draws a modulated layer's weight, zeroes its bias and (Pack) its
    generator; ``init_offset`` zeroes the DCNv1 generator; ``reset_parameters`` re-draws the weight."""
    layer = compat.ModulatedDeformConv2dPack(4, 4, 3)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)
    layer.init_weights()
    bound = 1 / (4 * 9) ** 0.5
    assert layer.weight.abs().max() <= bound and layer.weight.std() > 0
    assert not layer.bias.any() and not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    pack = compat.DeformConv2dPack(4, 4, 3)
    with torch.no_grad():
        for p in pack.parameters():
            p.fill_(7.0)
    pack.init_offset()
    assert not pack.conv_offset.weight.any() and (pack.weight == 7).all()
    pack.reset_parameters()
    assert (pack.weight != 7).all()
    assert not hasattr(compat.DeformConv2dPack, "init_weights")  # as mmcv: parents' init_weights skip it


# ------------------------------------------------------------------------------------------------
# (e) errors


def test_bad_inputs_name_the_argument():
    conv = compat.DeformConv2d(4, 4, 3, padding=1, deform_groups=2)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="Expected 4D tensor as input, got 3D"):
        conv(x[0], torch.zeros(36, 5, 5))
    offset_message = r"offset must have shape \(B, 2 \* deform_groups \* kh \* kw = 36"
    with pytest.raises(RuntimeError, match=offset_message):
        conv(x, torch.zeros(2, 18, 5, 5))
    mconv = compat.ModulatedDeformConv2d(4, 4, 3, padding=1, deform_groups=2)
    with pytest.raises(RuntimeError, match=r"mask must have shape \(B, deform_groups \* kh \* kw = 18"):
        mconv(x, torch.zeros(2, 36, 5, 5), torch.ones(2, 9, 5, 5))
    with pytest.raises(RuntimeError, match="deform_groups=3 must divide the input's 4 channels"):
        compat.DeformConv2d(4, 4, 3, padding=1, deform_groups=3)(x, torch.zeros(2, 54, 5, 5))
    with pytest.raises(AssertionError, match="bias=True"):
        compat.deform_conv2d(x, torch.zeros(2, 18, 3, 3), torch.randn(4, 4, 3, 3), bias=True)
    with pytest.raises(ValueError, match="stride"):
        compat.deform_conv2d(x, torch.zeros(2, 18, 3, 3), torch.randn(4, 4, 3, 3), stride=(1, 1, 1))


@pytest.mark.parametrize("name", CONV_CLASSES)
def test_unknown_keyword_names_class_and_keyword(name):
    with pytest.raises(TypeError, match=f"{name}: .*unexpected keyword argument 'deform_group'"):
        getattr(compat, name)(4, 4, 3, deform_group=2)
    with pytest.raises(TypeError, match=f"{name}: got deform_groups=2 and its legacy name deformable_groups"):
        getattr(compat, name)(4, 4, 3, deform_groups=2, deformable_groups=2)
    with pytest.warns(DeprecationWarning, match='"deformable_groups" is deprecated'):
        assert getattr(compat, name)(4, 4, 3, deformable_groups=2).deform_groups == 2


def test_any_batch_size_and_no_mmengine_import():
    """``im2col_step`` has no effect on the result; the module imports without mmengine."""
    conv = compat.DeformConv2d(2, 2, 3, padding=1, im2col_step=4)
    x, offset = torch.randn(7, 2, 5, 5), torch.randn(7, 18, 5, 5)
    reference = compat.DeformConv2d(2, 2, 3, padding=1, im2col_step=64)
    reference.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x, offset), reference(x, offset))
    script = ("import sys; sys.modules['mmengine'] = None; sys.modules['mmcv'] = None; "
              "import dcn_plugin.compat.mmcv as m; print(m.DeformConv2dPack.__name__)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "DeformConv2dPack", proc.stderr


# ------------------------------------------------------------------------------------------------
# mmdetection's own code, unchanged but for the one name (needs mmdetection 3.x beside mmcv-full)


@pytest.fixture
def mmdet_modules(mmcv_ops):
    try:
        from mmdet.models.dense_heads import fovea_head, guided_anchor_head, tood_head
        from mmdet.models.necks import dyhead
    except Exception as exc:  # noqa: BLE001 - any failure to import mmdet means: not here
        pytest.skip(f"needs mmdetection 3.3.0 beside mmcv-full ({exc}); the venv that "
                    "`bash ../shared/tools/mmcv-full-env.sh` builds has both")
    return tood_head, dyhead, fovea_head, guided_anchor_head


def test_mmdet_tood_deform_sampling(mmdet_modules, monkeypatch):
    """TOOD's ``deform_sampling`` calls ``deform_conv2d(feat, offset, weight, 1, 0, 1, c, c)``."""
    tood_head = mmdet_modules[0]
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(2, 4, 6, 7, generator=g, dtype=torch.float64)
    offset = 3 * torch.randn(2, 2 * 4, 6, 7, generator=g, dtype=torch.float64)
    theirs = tood_head.TOODHead.deform_sampling(None, feat, offset)
    monkeypatch.setattr(tood_head, "deform_conv2d", compat.deform_conv2d)
    torch.testing.assert_close(tood_head.TOODHead.deform_sampling(None, feat, offset), theirs, **TOL)


def test_mmdet_dyhead(mmdet_modules, monkeypatch):
    """DyHead (via ``DyDCNv2``) builds ``ModulatedDeformConv2d(in, out, 3, stride=stride, padding=1,
    bias=bias)`` and calls it as ``conv(x, offset, mask)``: the whole DyHead (one level) gives the
    same output and gradients (input, every parameter) from the same state_dict.

    Every parameter is randomised: at DyHead's own initialisation the GroupNorm (one channel per
    group, zero shift) makes each channel's spatial mean zero, so the scale attention's ReLU sees
    rounding noise (about 1e-17) and its gradient follows the noise's sign, for mmcv as for us.

    With more than one level, mmdet 3.3.0's DyHead hands ``spatial_conv_high`` the offset of the
    level below, twice the output's size. mmcv's kernel does not check the offset's shape and reads
    its memory as if it had the output's size (a silent wrong answer); here that raises, naming the
    shapes. (mmdetection's later code slices the offset to the output's size.)"""
    dyhead = mmdet_modules[1]
    theirs = dyhead.DyHead(16, 16, num_blocks=1, zero_init_offset=False).double()
    monkeypatch.setattr(dyhead, "ModulatedDeformConv2d", compat.ModulatedDeformConv2d)
    ours = dyhead.DyHead(16, 16, num_blocks=1, zero_init_offset=False).double()
    assert isinstance(ours.dyhead_blocks[0].spatial_conv_mid.conv, compat.ModulatedDeformConv2d)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2, generator=g)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 16, 12, 12, generator=g, dtype=torch.float64)
    results = []
    for model in (ours, theirs):
        level = x.clone().requires_grad_()
        (out,) = model([level])
        out.square().sum().backward()
        results.append((out, level.grad, {n: p.grad for n, p in model.named_parameters()}))
    (out, grad_x, grads), (out_e, grad_x_e, grads_e) = results
    assert out.abs().sum() > 0
    torch.testing.assert_close(out, out_e, **TOL)
    torch.testing.assert_close(grad_x, grad_x_e, **TOL)
    assert grads.keys() == grads_e.keys()
    for key in grads_e:
        torch.testing.assert_close(grads[key], grads_e[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")
    with pytest.raises(RuntimeError, match=r"offset has spatial shape \[12, 12\] but the grid .* \[6, 6\]"):
        ours([x, torch.randn(2, 16, 6, 6, dtype=torch.float64)])


@pytest.mark.parametrize("module_index,name,shape_channels",
                         [(2, "FeatureAlign", 4), (3, "FeatureAdaption", 2)])
def test_mmdet_feature_adaption(mmdet_modules, monkeypatch, module_index, name, shape_channels):
    """FoveaBox's ``FeatureAlign`` and Guided Anchoring's ``FeatureAdaption`` build
    ``DeformConv2d(in, out, kernel_size=k, padding=(k - 1) // 2, deform_groups=4)``, initialise it
    through mmengine's ``init_cfg`` (``Normal`` overriding ``conv_adaption``) and call it as
    ``conv(x, offset)``: the same initialisation, outputs and gradients as with mmcv-full."""
    module = mmdet_modules[module_index]
    theirs = getattr(module, name)(8, 8, kernel_size=3, deform_groups=4)
    monkeypatch.setattr(module, "DeformConv2d", compat.DeformConv2d)
    ours = getattr(module, name)(8, 8, kernel_size=3, deform_groups=4)
    assert type(ours.conv_adaption) is compat.DeformConv2d
    for model in (ours, theirs):
        torch.manual_seed(0)
        model.init_weights()
    for key, value in theirs.state_dict().items():  # the same draws, through mmengine's initialisers
        assert torch.equal(ours.state_dict()[key], value), key
    assert 0.005 < ours.conv_adaption.weight.std() < 0.02  # Normal(std=0.01) reached our layer
    ours, theirs = ours.double(), theirs.double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 7, 6, generator=g, dtype=torch.float64)
    shape = 3 * torch.randn(2, shape_channels, 7, 6, generator=g, dtype=torch.float64)
    (out, grads_in, grads), (out_e, grads_in_e, grads_e) = _run(ours, x, (shape,)), _run(theirs, x, (shape,))
    torch.testing.assert_close(out, out_e, **TOL)
    torch.testing.assert_close(grads_in[0], grads_in_e[0], **TOL)
    for key in grads_e:
        torch.testing.assert_close(grads[key], grads_e[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


# ------------------------------------------------------------------------------------------------
# the project's optimizer rule (dcn_offset_lr_mult) sees the compat layers as mmengine sees mmcv's


def _optimizer_groups(model: nn.Module, constructor: Optional[str] = None) -> dict:
    """Parameter name -> (lr, weight_decay), with ``dcn_offset_lr_mult=0.1`` and bias rules."""
    from mmengine.optim import build_optim_wrapper

    config = dict(optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4),
                  paramwise_cfg=dict(dcn_offset_lr_mult=0.1, bias_lr_mult=2.0, bias_decay_mult=0.0))
    if constructor:
        config["constructor"] = constructor
    optimizer = build_optim_wrapper(model, config).optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def _net(module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), module.DeformConv2dPack(4, 4, 3),
                         module.ModulatedDeformConv2dPack(4, 4, 3), module.DeformConv2d(4, 4, 3),
                         module.ModulatedDeformConv2d(4, 4, 3))


def test_offset_lr_mult_reaches_conv_offset():
    pytest.importorskip("mmengine", reason="needs mmengine: pip install mmengine")
    import dcn_plugin.layers  # noqa: F401 - registers the constructor

    groups = _optimizer_groups(_net(compat), "dcn_plugin.DCNOptimWrapperConstructor")
    offsets = [n for n in groups if ".conv_offset." in n]
    assert len(offsets) == 4
    for name in offsets:
        assert groups[name] == (pytest.approx(0.001), 1e-4), name


def test_optimizer_groups_as_mmengine_gives_real_mmcv(mmcv_ops):
    """mmengine's own rule on mmcv-full's layers, against the project's on the compat layers."""
    import dcn_plugin.layers  # noqa: F401 - registers the constructor

    assert _optimizer_groups(_net(compat), "dcn_plugin.DCNOptimWrapperConstructor") == \
        _optimizer_groups(_net(mmcv_ops))
