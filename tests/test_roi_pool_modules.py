"""The RoI pooling modules: drop-in for mmcv's ``DeformRoIPool``, ``DeformRoIPoolPack`` and
``ModulatedDeformRoIPoolPack`` (same arguments, state_dict keys and outputs), R-FCN's
``DeformablePSRoIPooling``, and their registration in mmengine's registry.

mmcv-full is not needed to compare with mmcv: mmcv's own Python module (``mmcv/ops/deform_roi_pool.py``,
shipped by mmcv-lite too) is loaded with its compiled extension replaced by dcn_plugin's op, so its
module code (offset and mask heads, reshapes, autograd Function) runs around our kernel, whose
values are checked against mmcv's published ones in ``test_roi_pool.py``.
"""

from __future__ import annotations

import importlib.util
import io
import os
import types

import pytest
import torch
from extras import require

from dcn_plugin import ops


class _MmcvExtension:
    """mmcv's ``_ext`` functions for deform_roi_pool, computed by dcn_plugin's op (mmcv passes an
    empty tensor for an absent offset and writes into preallocated outputs)."""

    @staticmethod
    def deform_roi_pool_forward(input, rois, offset, output, pooled_height, pooled_width, spatial_scale,
                                sampling_ratio, gamma):
        output.copy_(torch.ops.dcn_plugin.deform_roi_pool(
            input, rois, offset if offset.numel() else None, [pooled_height, pooled_width], spatial_scale,
            sampling_ratio, gamma))

    @staticmethod
    def deform_roi_pool_backward(grad_output, input, rois, offset, grad_input, grad_offset, pooled_height,
                                 pooled_width, spatial_scale, sampling_ratio, gamma):
        has_offset = offset.numel() > 0
        grads = torch.ops.dcn_plugin.deform_roi_pool_backward(
            grad_output, input, rois, offset if has_offset else None, [pooled_height, pooled_width],
            spatial_scale, sampling_ratio, gamma, [True, has_offset])
        grad_input.copy_(grads[0])
        if has_offset:
            grad_offset.copy_(grads[1])


@pytest.fixture(scope="module")
def mmcv_roi():
    """mmcv's ``mmcv/ops/deform_roi_pool.py`` as a module, its extension replaced (see above)."""
    require("mmcv.utils")
    import mmcv.utils.ext_loader as ext_loader

    path = os.path.join(os.path.dirname(importlib.util.find_spec("mmcv").origin), "ops", "deform_roi_pool.py")
    if not os.path.exists(path):
        pytest.skip(f"needs mmcv's ops/deform_roi_pool.py (mmcv-lite or mmcv-full 2.x), not at {path}")
    module = types.ModuleType("mmcv_deform_roi_pool")
    module.__package__ = "mmcv.ops"  # its `from ..utils import ext_loader`
    load_ext = ext_loader.load_ext
    ext_loader.load_ext = lambda name, functions: _MmcvExtension
    try:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), module.__dict__)
    finally:
        ext_loader.load_ext = load_ext
    return module


def _inputs(channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 12, 14, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 4.0, 6.0, 40.0, 30.0], [1, -8.0, 10.0, 20.0, 60.0], [1, 30.0, 2.0, 56.0, 47.0],
                         [0, 10.0, 10.0, 10.0, 20.0]], dtype=torch.float64)
    return x, rois


def _randomise(module, seed=1):
    """Non-zero weights everywhere (the offset and mask heads start at zero), so offsets and masks
    are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return module


def _run(module, x, rois):
    x = x.detach().clone().requires_grad_()
    out = module(x, rois)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("name", ["DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"])
def test_mmcv_checkpoint_loads_and_gives_mmcv_outputs(mmcv_roi, name):
    """A state_dict saved from mmcv's module loads strictly into ours, and both give the same output,
    input gradient and parameter gradients."""
    args = dict(output_size=(3, 4), output_channels=4, deform_fc_channels=16, spatial_scale=0.25,
                sampling_ratio=0, gamma=0.2)
    theirs = _randomise(getattr(mmcv_roi, name)(**args).double())
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = getattr(ops, name)(**args).double()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x, rois = _inputs()
    (out, grad_x, grads), (out_e, grad_x_e, grads_e) = _run(ours, x, rois), _run(theirs, x, rois)
    assert out.abs().sum() > 0
    torch.testing.assert_close(out, out_e, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad_x, grad_x_e, atol=1e-12, rtol=1e-10)
    for key in grads_e:
        torch.testing.assert_close(grads[key], grads_e[key], atol=1e-12, rtol=1e-10, msg=key)


@pytest.mark.parametrize("name", ["DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"])
def test_same_construction_as_mmcv(mmcv_roi, name):
    """Same parameters, shapes and zero-initialised heads as mmcv's module (mmcv's own default init
    elsewhere comes from nn.Linear, as ours)."""
    args = dict(output_size=7, output_channels=8, deform_fc_channels=32) if name != "DeformRoIPool" else \
        dict(output_size=7)
    theirs, ours = getattr(mmcv_roi, name)(**args), getattr(ops, name)(**args)
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    for key, value in theirs.state_dict().items():
        assert bool((value == 0).all()) == bool((ours.state_dict()[key] == 0).all()), key
    for attribute in ("output_size", "spatial_scale", "sampling_ratio", "gamma"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute


def test_pack_starts_as_roi_align():
    """At initialisation the offsets are zero (DeformRoIPoolPack == DeformRoIPool without offsets)
    and the modulation is sigmoid(0) = 1/2."""
    x, rois = _inputs()
    plain = ops.DeformRoIPool(3, spatial_scale=0.25)(x, rois)
    torch.testing.assert_close(ops.DeformRoIPoolPack(3, 4, 16, spatial_scale=0.25).double()(x, rois), plain)
    torch.testing.assert_close(ops.ModulatedDeformRoIPoolPack(3, 4, 16, spatial_scale=0.25).double()(x, rois),
                               plain / 2)


@pytest.mark.parametrize("name", ["DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"])
def test_pack_with_no_rois(name):
    """No RoIs give an empty output and gradients (mmcv's ``x.view(0, -1)`` fails here)."""
    module = _randomise(getattr(ops, name)(2, 4, 8).double())
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    out = module(x, torch.zeros(0, 5, dtype=torch.float64))
    assert out.shape == (0, 4, 2, 2)
    out.sum().backward()
    assert x.grad is not None and not x.grad.any()


def test_psroi_module():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3 * 4, 9, 9, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 14.0, 15.0], [1, 3.0, 0.0, 9.0, 17.0]], dtype=torch.float64)
    offset = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    pool = ops.DeformablePSRoIPooling(0.5, output_dim=3, group_size=2, pooled_size=3, sample_per_part=2,
                                      trans_std=0.1)
    assert pool.part_size == 3
    torch.testing.assert_close(pool(x, rois, offset),
                               ops.deform_psroi_pool(x, rois, offset, 0.5, 3, 2, 3, 3, 2, 0.1))
    no_trans = ops.DeformablePSRoIPooling(0.5, 3, 2, 3, sample_per_part=2, trans_std=0.1, no_trans=True)
    torch.testing.assert_close(no_trans(x, rois, offset),
                               ops.deform_psroi_pool(x, rois, None, 0.5, 3, 2, 3, 3, 2))
    assert "no_trans=True" in repr(no_trans)


# ------------------------------------------------------------------------------------------------
# mmengine registry


@pytest.mark.parametrize("scoped", [False, True], ids=["bare", "scoped"])
@pytest.mark.parametrize("name", ["DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack",
                                  "DeformablePSRoIPooling"])
def test_built_from_config(name, scoped):
    require("mmengine")
    from mmengine.registry import MODELS

    import dcn_plugin.layers

    configs = {
        "DeformRoIPool": dict(output_size=2, spatial_scale=0.25),
        "DeformRoIPoolPack": dict(output_size=2, output_channels=4, deform_fc_channels=8, spatial_scale=0.25),
        "ModulatedDeformRoIPoolPack": dict(output_size=2, output_channels=4, deform_fc_channels=8,
                                           spatial_scale=0.25),
        "DeformablePSRoIPooling": dict(spatial_scale=0.25, output_dim=1, group_size=2, pooled_size=2,
                                       no_trans=True),
    }
    layer = MODELS.build(dict(type=("dcn_plugin." if scoped else "") + name, **configs[name]))
    assert type(layer) is dcn_plugin.layers.ROI_LAYERS[name] is getattr(ops, name)
    x, rois = _inputs()
    assert layer.double()(x, rois).shape[0] == rois.shape[0]
