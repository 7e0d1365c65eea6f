"""``dcn_plugin.compat.detectron2``: detectron2's ``DeformConv`` / ``ModulatedDeformConv``, and
``install()`` into a detectron2 package.

Oracles: detectron2's own published test values (``tests/layers/test_deformable.py``, copied as
published, source named at each), detectron2's signatures and ``repr`` text (hard-coded from
``detectron2/layers/deform_conv.py``), and its initialisation (the same random draws). detectron2
is not on PyPI, so ``install()`` is tested on a stand-in package with detectron2's layout, whose
ResNet module imports the names as the real ``detectron2/modeling/backbone/resnet.py`` does.
"""

from __future__ import annotations

import inspect
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcn_plugin import ops
from dcn_plugin.compat import detectron2 as compat
from dcn_plugin.compat.detectron2 import DeformConv, ModulatedDeformConv

# ------------------------------------------------------------------------------------------------
# detectron2's published values (tests/layers/test_deformable.py)

# From detectron2's tests/layers/test_deformable.py (test_forward_output, test_forward_output_on_cpu),
# copied as published: a 5x5 ramp, every offset 0.5, weight of ones, kernel 3, padding 1.
deform_results = np.array(
    [
        [30, 41.25, 48.75, 45, 28.75],
        [62.25, 81, 90, 80.25, 50.25],
        [99.75, 126, 135, 117.75, 72.75],
        [105, 131.25, 138.75, 120, 73.75],
        [71.75, 89.25, 93.75, 80.75, 49.5],
    ]
)

# dtype, rtol, atol (np.allclose's defaults for the float types; half types round the ramp's sums).
DTYPES = [
    pytest.param(torch.float64, 1e-5, 1e-8, id="float64"),
    pytest.param(torch.float32, 1e-5, 1e-8, id="float32"),
    pytest.param(torch.float16, 2e-3, 1e-2, id="float16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-1, id="bfloat16"),
]


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_detectron2_published_forward_output(dtype, rtol, atol):
    """detectron2's ``test_forward_output_on_cpu`` (DCNv1), and its CUDA-only ``test_forward_output``
    (DCNv2 with a mask of 0.5: half the DCNv1 result), on the CPU in every dtype."""
    N, C, H, W = shape = 1, 1, 5, 5
    kernel_size = 3
    padding = 1
    inputs = torch.arange(np.prod(shape), dtype=torch.float32).reshape(*shape).to(dtype)
    offset_channels = kernel_size * kernel_size * 2
    offset = torch.full((N, offset_channels, H, W), 0.5, dtype=dtype)

    deform = DeformConv(C, C, kernel_size=kernel_size, padding=padding).to(dtype)
    deform.weight = torch.nn.Parameter(torch.ones_like(deform.weight))
    output = deform(inputs, offset).detach().double().numpy()
    assert np.allclose(output.flatten(), deform_results.flatten(), rtol=rtol, atol=atol)

    mask_channels = kernel_size * kernel_size
    mask = torch.full((N, mask_channels, H, W), 0.5, dtype=dtype)
    modulate_deform = ModulatedDeformConv(C, C, kernel_size, padding=padding, bias=False).to(dtype)
    modulate_deform.weight = deform.weight
    output = modulate_deform(inputs, offset, mask).detach().double().numpy()
    assert np.allclose(output.flatten(), deform_results.flatten() * 0.5, rtol=rtol, atol=atol)


def test_detectron2_published_small_input():
    """detectron2's ``test_small_input`` (CUDA-only there): input smaller than the kernel."""
    for kernel_size in [3, 5]:
        padding = kernel_size // 2
        N, C, H, W = shape = (1, 1, kernel_size - 1, kernel_size - 1)
        inputs = torch.rand(shape)
        offset_channels = kernel_size * kernel_size * 2
        offset = torch.randn((N, offset_channels, H, W), dtype=torch.float32)
        deform = DeformConv(C, C, kernel_size=kernel_size, padding=padding)
        output = deform(inputs, offset)
        assert output.shape == inputs.shape

        mask_channels = kernel_size * kernel_size
        mask = torch.ones((N, mask_channels, H, W), dtype=torch.float32)
        modulate_deform = ModulatedDeformConv(C, C, kernel_size, padding=padding, bias=False)
        output = modulate_deform(inputs, offset, mask)
        assert output.shape == inputs.shape


def test_detectron2_published_raise_exception():
    """detectron2's ``test_raise_exception`` (CUDA-only there): wrong offset or mask channels raise
    ``RuntimeError`` (here naming the argument and the expected count)."""
    N, C, H, W = shape = 1, 1, 3, 3
    kernel_size = 3
    padding = 1
    inputs = torch.rand(shape, dtype=torch.float32)
    offset_channels = kernel_size * kernel_size  # This is wrong channels for offset
    offset = torch.randn((N, offset_channels, H, W), dtype=torch.float32)
    deform = DeformConv(C, C, kernel_size=kernel_size, padding=padding)
    message = r"offset must have shape \(B, 2 \* deformable_groups \* kh \* kw = 18"
    with pytest.raises(RuntimeError, match=message):
        deform(inputs, offset)

    offset_channels = kernel_size * kernel_size * 2
    offset = torch.randn((N, offset_channels, H, W), dtype=torch.float32)
    mask_channels = kernel_size * kernel_size * 2  # This is wrong channels for mask
    mask = torch.ones((N, mask_channels, H, W), dtype=torch.float32)
    modulate_deform = ModulatedDeformConv(C, C, kernel_size, padding=padding, bias=False)
    with pytest.raises(RuntimeError, match=r"mask must have shape \(B, deformable_groups \* kh \* kw = 9"):
        modulate_deform(inputs, offset, mask)


def test_detectron2_published_repr():
    """detectron2's ``test_repr``, copied as published."""
    module = DeformConv(3, 10, kernel_size=3, padding=1, deformable_groups=2)
    correct_string = (
        "DeformConv(in_channels=3, out_channels=10, kernel_size=(3, 3), "
        "stride=(1, 1), padding=(1, 1), dilation=(1, 1), "
        "groups=1, deformable_groups=2, bias=False)"
    )
    assert repr(module) == correct_string

    module = ModulatedDeformConv(3, 10, kernel_size=3, padding=1, deformable_groups=2)
    correct_string = (
        "ModulatedDeformConv(in_channels=3, out_channels=10, kernel_size=(3, 3), "
        "stride=1, padding=1, dilation=1, groups=1, deformable_groups=2, bias=True)"
    )
    assert repr(module) == correct_string


# ------------------------------------------------------------------------------------------------
# signatures, construction, initialisation

# From detectron2/layers/deform_conv.py.
DETECTRON2_SIGNATURES = {
    "DeformConv": "(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, "
                  "deformable_groups=1, bias=False, norm=None, activation=None)",
    "ModulatedDeformConv": "(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, "
                           "groups=1, deformable_groups=1, bias=True, norm=None, activation=None)",
}
DETECTRON2_FORWARDS = {"DeformConv": "(self, x, offset)", "ModulatedDeformConv": "(self, x, offset, mask)"}


def _plain(signature: inspect.Signature) -> str:
    return str(signature.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                             for p in signature.parameters.values()],
                                 return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize("name", sorted(DETECTRON2_SIGNATURES))
def test_signatures_are_detectron2s(name):
    cls = getattr(compat, name)
    assert _plain(inspect.signature(cls)) == DETECTRON2_SIGNATURES[name]
    assert _plain(inspect.signature(cls.forward)) == DETECTRON2_FORWARDS[name]
    assert issubclass(cls, ops.DeformConv2d)  # what the project recognises as a deformable layer


def test_construction_as_detectron2():
    """``DeformConv`` asserts no bias and groups that divide the channels; state_dict keys are
    ``weight`` (and ``bias``), plus the norm's; an unknown keyword names the class and keyword."""
    with pytest.raises(AssertionError):
        DeformConv(4, 4, 3, bias=True)
    with pytest.raises(AssertionError, match="in_channels 3 cannot be divisible by groups 2"):
        DeformConv(3, 4, 3, groups=2)
    assert DeformConv(4, 4, 3).bias is None and list(DeformConv(4, 4, 3).state_dict()) == ["weight"]
    assert list(ModulatedDeformConv(4, 4, 3).state_dict()) == ["weight", "bias"]
    assert ModulatedDeformConv(4, 4, 3).with_bias and not ModulatedDeformConv(4, 4, 3, bias=False).with_bias
    layer = DeformConv(4, 4, 3, norm=nn.BatchNorm2d(4))
    assert [k for k in layer.state_dict() if not k.startswith("norm.")] == ["weight"]
    assert "norm.running_mean" in layer.state_dict()
    with pytest.raises(TypeError, match=r"DeformConv.__init__\(\) got an unexpected keyword argument 'def"):
        DeformConv(4, 4, 3, deform_groups=2)


@pytest.mark.parametrize("cls", [DeformConv, ModulatedDeformConv])
def test_initialisation_as_detectron2(cls):
    """The same draws as detectron2's ``nn.init.kaiming_uniform_(weight, nonlinearity="relu")`` on a
    fresh tensor; bias zero."""
    torch.manual_seed(0)
    layer = cls(4, 6, 3, groups=2)
    torch.manual_seed(0)
    expected = torch.empty(6, 2, 3, 3)
    nn.init.kaiming_uniform_(expected, nonlinearity="relu")
    assert torch.equal(layer.weight.detach(), expected)
    if layer.bias is not None:
        assert not layer.bias.any()


# ------------------------------------------------------------------------------------------------
# what detectron2 does not do on the CPU


def _inputs(deformable_groups=1, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 6, 5, generator=g, dtype=dtype)
    offset = torch.randn(batch, 2 * deformable_groups * 9, 6, 5, generator=g, dtype=dtype)
    mask = torch.rand(batch, deformable_groups * 9, 6, 5, generator=g, dtype=dtype)
    return x, offset, mask


@pytest.mark.parametrize("deformable_groups", [1, 2])
def test_cpu_backward_and_deformable_groups(deformable_groups):
    """detectron2 raises in the CPU backward (and for ``deformable_groups != 1`` on the CPU); here
    both classes run, giving the op's gradients (gradcheck in float64)."""
    x, offset, mask = _inputs(deformable_groups, batch=1)
    deform = DeformConv(4, 3, 3, padding=1, deformable_groups=deformable_groups).double()
    modulated = ModulatedDeformConv(4, 3, 3, padding=1, deformable_groups=deformable_groups).double()
    with torch.no_grad():
        modulated.bias.normal_()
    args = [t.requires_grad_() for t in (x, offset, mask)]
    torch.autograd.gradcheck(lambda a, o: deform(a, o), args[:2])
    torch.autograd.gradcheck(lambda a, o, m: modulated(a, o, m), args)
    out = modulated(*args)
    out.sum().backward()
    assert modulated.weight.grad is not None and modulated.bias.grad is not None
    torch.testing.assert_close(out, ops.deform_conv2d(x, modulated.weight, offset, mask, modulated.bias,
                                                      padding=1))


def test_norm_and_activation_applied_in_order():
    x, offset, mask = _inputs(dtype=torch.float32)
    norm = nn.GroupNorm(1, 3)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    layer = ModulatedDeformConv(4, 3, 3, padding=1, norm=norm, activation=F.relu)
    plain = ModulatedDeformConv(4, 3, 3, padding=1)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("norm.")})
    torch.testing.assert_close(layer(x, offset, mask), F.relu(norm(plain(x, offset, mask))))


@pytest.mark.parametrize("cls", [DeformConv, ModulatedDeformConv])
def test_empty_input(cls):
    """detectron2's empty-input path: an empty output of the conv's output shape, without running
    the norm (BatchNorm in training would fail on an empty batch); gradients flow."""
    layer = cls(4, 6, 3, stride=2, padding=1, norm=nn.BatchNorm2d(6)).train()
    x = torch.zeros(0, 4, 9, 7, requires_grad=True)
    args = (torch.zeros(0, 18, 5, 4),) + ((torch.zeros(0, 9, 5, 4),) if cls is ModulatedDeformConv else ())
    out = layer(x, *args)
    assert out.shape == (0, 6, 5, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------
# install() into a detectron2 package (a stand-in with detectron2's layout)

STAND_IN = {
    "detectron2/__init__.py": "",
    "detectron2/layers/__init__.py": """
        from torch import nn

        from .deform_conv import DeformConv, ModulatedDeformConv


        class Conv2d(nn.Conv2d):
            def __init__(self, *args, norm=None, activation=None, **kwargs):
                super().__init__(*args, **kwargs)
                self.norm = norm
                self.activation = activation

            def forward(self, x):
                x = super().forward(x)
                x = self.norm(x) if self.norm is not None else x
                return self.activation(x) if self.activation is not None else x


        def get_norm(norm, out_channels):
            return nn.BatchNorm2d(out_channels) if norm == "BN" else None
    """,
    # detectron2's own classes raise on the CPU (its ModulatedDeformConv's forward, and the backward).
    "detectron2/layers/deform_conv.py": """
        import torch
        from torch import nn


        class DeformConv(nn.Module):
            def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                         groups=1, deformable_groups=1, bias=False, norm=None, activation=None):
                super().__init__()
                self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, kernel_size,
                                                       kernel_size))

            def forward(self, x, offset):
                raise NotImplementedError("Deformable Conv is not supported on CPUs!")


        class ModulatedDeformConv(DeformConv):
            def forward(self, x, offset, mask):
                raise NotImplementedError("Deformable Conv is not supported on CPUs!")
    """,
    "detectron2/modeling/__init__.py": "",
    "detectron2/modeling/backbone/__init__.py": "",
    # As detectron2/modeling/backbone/resnet.py: the names imported from detectron2.layers, the
    # deformable bottleneck's conv2_offset / conv2 and its mask split, stages chosen by
    # MODEL.RESNETS.DEFORM_ON_PER_STAGE (trimmed to what matters here).
    "detectron2/modeling/backbone/resnet.py": """
        import torch
        import torch.nn.functional as F
        from torch import nn

        from detectron2.layers import Conv2d, DeformConv, ModulatedDeformConv, get_norm


        class DeformBottleneckBlock(nn.Module):
            def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1, num_groups=1,
                         norm="BN", dilation=1, deform_modulated=False, deform_num_groups=1):
                super().__init__()
                self.deform_modulated = deform_modulated
                self.conv1 = Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False,
                                    norm=get_norm(norm, bottleneck_channels))
                if deform_modulated:
                    deform_conv_op = ModulatedDeformConv
                    offset_channels = 27
                else:
                    deform_conv_op = DeformConv
                    offset_channels = 18
                self.conv2_offset = Conv2d(bottleneck_channels, offset_channels * deform_num_groups,
                                           kernel_size=3, stride=stride, padding=1 * dilation,
                                           dilation=dilation)
                self.conv2 = deform_conv_op(bottleneck_channels, bottleneck_channels, kernel_size=3,
                                            stride=stride, padding=1 * dilation, bias=False,
                                            groups=num_groups, dilation=dilation,
                                            deformable_groups=deform_num_groups,
                                            norm=get_norm(norm, bottleneck_channels))
                self.conv3 = Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                                    norm=get_norm(norm, out_channels))
                self.shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                                       norm=get_norm(norm, out_channels))
                nn.init.constant_(self.conv2_offset.weight, 0)
                nn.init.constant_(self.conv2_offset.bias, 0)

            def forward(self, x):
                out = F.relu_(self.conv1(x))
                if self.deform_modulated:
                    offset_mask = self.conv2_offset(out)
                    offset_x, offset_y, mask = torch.chunk(offset_mask, 3, dim=1)
                    offset = torch.cat((offset_x, offset_y), dim=1)
                    mask = mask.sigmoid()
                    out = self.conv2(out, offset, mask)
                else:
                    offset = self.conv2_offset(out)
                    out = self.conv2(out, offset)
                out = F.relu_(out)
                out = self.conv3(out)
                return F.relu_(out + self.shortcut(x))


        class BottleneckBlock(DeformBottleneckBlock):
            def __init__(self, in_channels, out_channels, **kwargs):
                nn.Module.__init__(self)
                self.conv = Conv2d(in_channels, out_channels, kernel_size=3, stride=kwargs["stride"],
                                   padding=1)

            def forward(self, x):
                return F.relu(self.conv(x))


        def build_resnet_backbone(deform_on_per_stage, deform_modulated=False, deform_num_groups=1):
            stages, channels = [], 8
            for idx, deform in enumerate(deform_on_per_stage):
                block_class = DeformBottleneckBlock if deform else BottleneckBlock
                stages.append(block_class(channels, 2 * channels, bottleneck_channels=channels,
                                          stride=1 if idx == 0 else 2, deform_modulated=deform_modulated,
                                          deform_num_groups=deform_num_groups))
                channels *= 2
            return nn.Sequential(Conv2d(3, 8, kernel_size=3, padding=1), *stages)
    """,
}


@pytest.fixture
def stand_in_detectron2(tmp_path):
    for path, text in STAND_IN.items():
        file = tmp_path / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(textwrap.dedent(text))
    assert not any(name == "detectron2" or name.startswith("detectron2.") for name in sys.modules), \
        "a real detectron2 is imported in this process; the stand-in cannot replace it"
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == "detectron2" or n.startswith("detectron2.")]:
            del sys.modules[name]


def test_install_makes_detectron2_build_ours(stand_in_detectron2):
    import detectron2.modeling.backbone.resnet as resnet  # imported before install(), as in a real program

    original = resnet.build_resnet_backbone((False, True))
    with pytest.raises(NotImplementedError, match="not supported on CPUs"):
        original(torch.randn(1, 3, 8, 8))

    replaced = compat.install()
    assert replaced == sorted(f"{module}.{name}" for module in
                              ("detectron2.layers", "detectron2.layers.deform_conv",
                               "detectron2.modeling.backbone.resnet")
                              for name in ("DeformConv", "ModulatedDeformConv"))
    assert compat.install() == []  # a second call changes nothing
    import detectron2.layers

    assert detectron2.layers.DeformConv is DeformConv
    assert detectron2.layers.ModulatedDeformConv is ModulatedDeformConv

    for modulated, groups in ((False, 1), (True, 2)):
        model = resnet.build_resnet_backbone((False, True, True, True), deform_modulated=modulated,
                                             deform_num_groups=groups)
        deformable = [m.conv2 for m in model.modules() if isinstance(m, resnet.DeformBottleneckBlock)
                      and hasattr(m, "conv2")]
        assert len(deformable) == 3
        assert all(type(m) is (ModulatedDeformConv if modulated else DeformConv) for m in deformable)
        assert all(m.deformable_groups == groups for m in deformable)
        with torch.no_grad():  # give the zero-initialised offset convolutions something to do
            for block in model.modules():
                if hasattr(block, "conv2_offset"):
                    block.conv2_offset.weight.normal_(0, 0.1)
        x = torch.randn(2, 3, 16, 16, requires_grad=True)
        out = model(x)
        assert out.shape == (2, 128, 2, 2)
        out.square().mean().backward()
        assert x.grad.abs().sum() > 0
        for block in model.modules():
            if hasattr(block, "conv2_offset"):
                assert block.conv2.weight.grad.abs().sum() > 0
                assert block.conv2_offset.weight.grad.abs().sum() > 0


def test_install_without_detectron2(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)
    with pytest.raises(ImportError, match="install\\(\\) needs detectron2"):
        compat.install()
