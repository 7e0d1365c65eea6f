"""Bad input raises ``ValueError`` or ``RuntimeError`` naming the argument, never a crash or a
silent wrong answer. Each case changes one thing in a valid call (the valid calls are checked too)."""

from __future__ import annotations

import pytest
import torch

from dcn_plugin import ops


def r(*shape, dtype=torch.float64):
    """A random tensor made later, on the test's device."""
    return lambda device: torch.randn(*shape, device=device).to(dtype)


def i(*shape):
    return lambda device: torch.ones(*shape, dtype=torch.int64, device=device)


# valid calls: (2, 4, 5, 5) input, 6 output channels, 3x3 kernel, padding 1
BASES = {
    "deform_conv2d": dict(input=r(2, 4, 5, 5), weight=r(6, 4, 3, 3), offset=r(2, 18, 5, 5),
                          mask=r(2, 9, 5, 5), bias=r(6), stride=1, padding=1, dilation=1, groups=1),
    "deform_conv": dict(input=r(2, 4, 5, 5), weight=r(6, 4, 3, 3), offset=r(2, 18, 5, 5), mask=r(2, 9, 5, 5),
                        bias=r(6), stride=1, padding=1, dilation=1, groups=1),
    "deform_conv_transpose2d": dict(input=r(2, 4, 5, 5), weight=r(4, 6, 3, 3), offset=r(2, 18, 5, 5),
                                    mask=r(2, 9, 5, 5), bias=r(6), stride=2, padding=1, output_padding=1,
                                    dilation=1, groups=1),
    "deform_conv1d": dict(input=r(2, 4, 7), weight=r(6, 4, 3), offset=r(2, 3, 7), mask=r(2, 3, 7), bias=r(6),
                          stride=1, padding=1, dilation=1, groups=1),
    "deform_conv3d": dict(input=r(2, 4, 4, 4, 4), weight=r(6, 4, 2, 2, 2), offset=r(2, 24, 3, 3, 3),
                          mask=r(2, 8, 3, 3, 3), bias=r(6), stride=1, padding=0, dilation=1, groups=1),
}

C2, CT, C1, C3, CG = ("deform_conv2d", "deform_conv_transpose2d", "deform_conv1d", "deform_conv3d",
                      "deform_conv")

BAD = [
    # ranks
    (C2, dict(input=r(5, 5)), "input", "input-rank-2"),
    (C2, dict(input=r(1, 2, 4, 5, 5)), "input", "input-rank-5"),
    (C2, dict(weight=r(6, 4, 3)), "weight", "weight-rank-3-for-2d"),
    (CG, dict(weight=r(6, 4, 3, 3, 3, 3)), "weight", "weight-rank-6"),
    (CG, dict(weight=r(6, 4)), "weight", "weight-rank-2"),
    (CG, dict(weight=r(6, 4, 3)), "input", "input-rank-vs-1d-weight"),
    (C2, dict(weight=r(6, 4, 0, 3)), "weight", "weight-empty-kernel"),
    # channels and groups
    (C2, dict(weight=r(6, 3, 3, 3)), "input|weight", "channels-mismatch"),
    (C2, dict(input=r(2, 6, 5, 5), weight=r(4, 2, 3, 3), groups=3), "groups", "groups-not-dividing-out"),
    (C2, dict(input=r(2, 4, 5, 5), weight=r(6, 1, 3, 3), groups=3), "groups|input|weight",
     "groups-not-dividing-in"),
    (C2, dict(groups=0), "groups", "groups-zero"),
    (C2, dict(groups=-2), "groups", "groups-negative"),
    (C2, dict(groups=1.0), "groups", "groups-float"),
    # offset
    (C2, dict(offset=r(2, 17, 5, 5)), "offset", "offset-channels-not-multiple-of-NK"),
    (C2, dict(offset=r(2, 0, 5, 5)), "offset", "offset-no-channels"),
    (C2, dict(offset=r(2, 54, 5, 5)), "offset", "offset-groups-not-dividing-input"),
    (C2, dict(offset=r(2, 18, 4, 5)), "offset", "offset-spatial"),
    (C2, dict(offset=r(3, 18, 5, 5)), "offset", "offset-batch"),
    (C2, dict(offset=r(2, 18, 25)), "offset", "offset-rank"),
    (C1, dict(offset=r(2, 5, 7)), "offset", "1d-offset-channels"),
    (C3, dict(offset=r(2, 23, 3, 3, 3)), "offset", "3d-offset-channels"),
    (C3, dict(offset=r(2, 24, 3, 3, 4)), "offset", "3d-offset-spatial"),
    # mask
    (C2, dict(mask=r(2, 8, 5, 5)), "mask", "mask-channels-not-multiple-of-K"),
    (C2, dict(mask=r(2, 27, 5, 5)), "mask", "mask-groups-not-dividing-input"),
    (C2, dict(mask=r(2, 9, 5, 4)), "mask", "mask-spatial"),
    (C2, dict(mask=r(1, 9, 5, 5)), "mask", "mask-batch"),
    (C2, dict(mask=r(2, 9, 25)), "mask", "mask-rank"),
    (C3, dict(mask=r(2, 8, 3, 2, 3)), "mask", "3d-mask-spatial"),
    (C1, dict(mask=r(2, 4, 7)), "mask", "1d-mask-channels"),
    # bias
    (C2, dict(bias=r(5)), "bias", "bias-size"),
    (C2, dict(bias=r(6, 1)), "bias", "bias-rank"),
    # dtypes
    (C2, dict(weight=r(6, 4, 3, 3, dtype=torch.float32)), "weight", "weight-dtype"),
    (C2, dict(offset=r(2, 18, 5, 5, dtype=torch.float32)), "offset", "offset-dtype"),
    (C2, dict(mask=r(2, 9, 5, 5, dtype=torch.float32)), "mask", "mask-dtype"),
    (C2, dict(bias=r(6, dtype=torch.float32)), "bias", "bias-dtype"),
    (C2, dict(input=i(2, 4, 5, 5), weight=i(6, 4, 3, 3), offset=None, mask=None, bias=None), "input",
     "integer-input"),
    (C2, dict(offset=i(2, 18, 5, 5)), "offset", "integer-offset"),
    # stride, padding, dilation
    (C2, dict(stride=0), "stride", "stride-zero"),
    (C2, dict(stride=(1, -1)), "stride", "stride-negative"),
    (C2, dict(stride=1.5), "stride", "stride-float"),
    (C2, dict(stride=(1, 1, 1)), "stride", "stride-length"),
    (C2, dict(padding=-1), "padding", "padding-negative"),
    (C2, dict(padding=(1, 1, 1)), "padding", "padding-length"),
    (C2, dict(dilation=0), "dilation", "dilation-zero"),
    (C2, dict(dilation=(1, 1, 1)), "dilation", "dilation-length"),
    (C3, dict(dilation=(1, -1, 1)), "dilation", "3d-dilation-negative"),
    # output size
    (C2, dict(input=r(2, 4, 2, 2), padding=0, offset=None, mask=None), "input|output", "output-empty"),
    (C1, dict(input=r(2, 4, 1), padding=0, dilation=2, offset=None, mask=None), "input|output",
     "1d-output-empty"),
    # transposed
    (CT, dict(output_padding=2), "output_padding", "output-padding-not-below-stride-or-dilation"),
    (CT, dict(stride=1, output_padding=1, offset=None, mask=None), "output_padding",
     "output-padding-stride-1"),
    (CT, dict(output_padding=-1), "output_padding", "output-padding-negative"),
    (CT, dict(output_padding=(1, 1, 1)), "output_padding", "output-padding-length"),
    (CT, dict(weight=r(5, 6, 3, 3)), "input|weight", "transposed-channels-mismatch"),
    (CT, dict(groups=3, weight=r(4, 2, 3, 3)), "groups", "transposed-groups-not-dividing-input"),
    (CT, dict(offset=r(2, 72, 5, 5)), "offset", "transposed-offset-groups-not-dividing-output"),
    (CT, dict(offset=r(2, 18, 10, 10)), "offset", "transposed-offset-on-output-grid"),
    (CT, dict(mask=r(2, 36, 5, 5)), "mask", "transposed-mask-groups-not-dividing-output"),
    (CT, dict(bias=r(4)), "bias", "transposed-bias-size"),
    (CT, dict(input=r(2, 4, 1, 1), stride=1, padding=2, output_padding=0, offset=None, mask=None),
     "input|output|padding", "transposed-output-empty"),
]


def _materialize(name, overrides, device):
    args = {**BASES[name], **overrides}
    return {k: v(device) if callable(v) else v for k, v in args.items()}


@pytest.mark.parametrize("name", list(BASES))
def test_valid_bases(device, name):
    """The unchanged calls run, so every failure below is due to its one change."""
    out = getattr(ops, name)(**_materialize(name, {}, device))
    assert out.shape[:2] == (2, 6)


@pytest.mark.parametrize("name, overrides, match", [pytest.param(*b[:3], id=b[3]) for b in BAD])
def test_bad_input(device, name, overrides, match):
    args = _materialize(name, overrides, device)
    with pytest.raises((ValueError, RuntimeError), match=match):
        getattr(ops, name)(**args)


def test_enough_cases():
    assert len(BAD) >= 20


def _raw_args(device, **overrides):
    args = dict(input=torch.randn(2, 4, 5, 5, dtype=torch.float64, device=device),
                weight=torch.randn(6, 4, 3, 3, dtype=torch.float64, device=device),
                offset=torch.randn(2, 18, 5, 5, dtype=torch.float64, device=device),
                mask=torch.randn(2, 9, 5, 5, dtype=torch.float64, device=device),
                bias=torch.randn(6, dtype=torch.float64, device=device),
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], transposed=False, output_padding=[0, 0],
                groups=1)
    args.update(overrides)
    return list(args.values())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(stride=[1, 1, 1]), "stride"),
        (dict(padding=[1, 1, 1]), "padding"),
        (dict(dilation=[1, 1, 1]), "dilation"),
        (dict(stride=[0, 1]), "stride"),
        (dict(transposed=True, output_padding=[0, 0, 0], weight=torch.randn(4, 6, 3, 3, dtype=torch.float64)),
         "output_padding"),
        (dict(groups=0), "groups"),
        (dict(input=torch.randn(2, 4, 5, dtype=torch.float64)), "input|weight"),
    ],
    ids=["stride-length", "padding-length", "dilation-length", "stride-zero", "output-padding-length",
         "groups-zero", "input-rank"],
)
def test_bad_input_raw_op(device, overrides, match):
    """The op itself checks its arguments (the functional API is not the only way in)."""
    overrides = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()}
    with pytest.raises((ValueError, RuntimeError), match=match):
        torch.ops.dcn_plugin.deform_conv(*_raw_args(device, **overrides))


def test_bad_grad_output(device):
    args = _raw_args(device)
    del args[4]  # no bias in the backward op
    grad_output = torch.randn(2, 6, 4, 5, dtype=torch.float64, device=device)
    with pytest.raises((ValueError, RuntimeError), match="grad_output"):
        torch.ops.dcn_plugin.deform_conv_backward(grad_output, *args, [True] * 4)


@pytest.mark.parametrize("argument", ["weight", "offset", "mask", "bias"])
def test_mixed_devices(cuda_device, argument):
    args = _materialize(C2, {}, cuda_device)
    args[argument] = args[argument].cpu()
    with pytest.raises((ValueError, RuntimeError), match=argument):
        ops.deform_conv2d(**args)


def test_mixed_devices_input_on_cpu(cuda_device):
    args = _materialize(C2, {}, cuda_device)
    args["input"] = args["input"].cpu()
    with pytest.raises((ValueError, RuntimeError), match="input|weight"):
        ops.deform_conv2d(**args)


def test_workspace_limit_must_be_positive():
    with pytest.raises(ValueError, match="num_bytes"):
        ops.set_workspace_limit(0)


def test_mask_softmax_channels():
    with pytest.raises(ValueError, match="mask"):
        ops.mask_softmax2d(torch.randn(1, 10, 4, 4), 3)
