"""Tests of the OpenMMLab layers (``dcn_plugin.layers``) and registries (``dcn_plugin.registry``).

Skipped where mmengine or mmcv (mmcv-lite is enough) is not installed. Oracles: ``F.conv{N}d`` with
the same weights at initialisation, and ``tests/reference.py`` applied to the offset/mask split
exactly as mmcv-full's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack`` compute it.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from extras import require  # noqa: E402
from torch import nn

require("mmengine", "mmcv.cnn")

from mmcv.cnn import ConvModule, build_conv_layer  # noqa: E402
from mmengine.model import BaseModule  # noqa: E402
from mmengine.registry import MODELS as ROOT_MODELS  # noqa: E402
from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict  # noqa: E402
from reference import deform_conv_reference  # noqa: E402

import dcn_plugin.layers as layers  # noqa: E402
from dcn_plugin.layers import LAYERS, register_dcn_upgrade_hook, upgrade_dcn_state_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


def _dim(name: str) -> int:
    return int(name[-2]) if name[-1] == "d" else 2


def _input(name: str, channels: int = 4, size: int = 7, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, *[size] * _dim(name), dtype=DTYPE, requires_grad=True)


def _run(script: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _randomise_generators(module: nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, layers.DeformGenerator):
                m.weight.normal_(0, scale)
                m.bias.normal_(0, scale)


# ---- building through mmcv ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("scoped", [False, True], ids=["bare", "scoped"])
def test_build_conv_layer_forward_backward(name, scoped):
    cfg = dict(type=f"dcn_plugin.{name}" if scoped else name)
    frozen = copy.deepcopy(cfg)
    layer = build_conv_layer(cfg, 4, 6, 3, padding=1).double()
    assert cfg == frozen
    assert type(layer) is LAYERS[name]
    _randomise_generators(layer)
    x = _input(name)
    out = layer(x)
    assert out.shape == (2, 6, *[7] * _dim(name))
    out.square().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert layer.conv_offset.weight.grad is not None and layer.conv_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_conv_module_with_norm_and_act(name):
    conv_cfg = dict(type=name, deform_groups=2)
    norm_cfg = dict(type="GN", num_groups=2)
    act_cfg = dict(type="ReLU")
    cfgs = (conv_cfg, norm_cfg, act_cfg)
    frozen = copy.deepcopy(cfgs)
    block = ConvModule(4, 6, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg).double()
    assert cfgs == frozen
    assert type(block.conv) is LAYERS[name] and block.conv.deform_groups == 2
    assert block.conv.bias is None  # ConvModule's bias='auto' with a norm
    _randomise_generators(block)
    x = _input(name)
    out = block(x)
    assert out.shape == (2, 6, *[7] * _dim(name)) and (out >= 0).all()
    out.sum().backward()
    assert block.conv.conv_offset.weight.grad is not None


def test_models_build_does_not_mutate_config():
    cfg = dict(type="dcn_plugin.DCNv2", in_channels=4, out_channels=8, kernel_size=3, padding=1,
               deform_groups=2, mask_activation="sigmoid")
    frozen = copy.deepcopy(cfg)
    layer = ROOT_MODELS.build(cfg)
    assert cfg == frozen and type(layer) is layers.DCNv2
    assert layer.conv_offset.weight.shape == (3 * 2 * 9, 4, 3, 3)


def test_fpn_like_conv_module_with_dcn_bias():
    class TinyFPN(BaseModule):
        def __init__(self):
            super().__init__(init_cfg=dict(type="Xavier", layer="Conv2d", distribution="uniform"))
            cfg = dict(type="DCN")
            self.lateral = nn.ModuleList(ConvModule(c, 8, 1, conv_cfg=cfg, act_cfg=None) for c in (4, 6))
            self.fpn = nn.ModuleList(ConvModule(8, 8, 3, padding=1, conv_cfg=cfg, act_cfg=None)
                                     for _ in range(2))

        def forward(self, feats):
            lat = [lateral(f) for lateral, f in zip(self.lateral, feats)]
            lat[0] = lat[0] + F.interpolate(lat[1], size=lat[0].shape[2:])
            return [conv(x) for conv, x in zip(self.fpn, lat)]

    fpn = TinyFPN().double()
    fpn.init_weights()
    for block in list(fpn.lateral) + list(fpn.fpn):
        assert block.conv.bias is not None  # bias='auto' without a norm: DCN(bias=True)
        assert not block.conv.conv_offset.weight.any()
    feats = [torch.randn(1, 4, 8, 8, dtype=DTYPE), torch.randn(1, 6, 4, 4, dtype=DTYPE)]
    outs = fpn(feats)
    assert [o.shape[2:] for o in outs] == [(8, 8), (4, 4)]
    sum(o.sum() for o in outs).backward()


# ---- registries, fresh processes, import orders -------------------------------------------


def test_scoped_name_resolves_in_fresh_process():
    out = _run("""
        import sys
        from mmengine.registry import MODELS
        from mmcv.cnn import build_conv_layer
        assert not any(m == 'dcn_plugin' or m.startswith('dcn_plugin.') for m in sys.modules)
        layer = MODELS.build(dict(type='dcn_plugin.DCNv2', in_channels=4, out_channels=8, kernel_size=3))
        assert type(layer).__module__ == 'dcn_plugin.layers.dcn', type(layer)
        conv = build_conv_layer(dict(type='dcn_plugin.DCN'), 4, 8, 3)
        assert type(conv).__name__ == 'DCN'
        print('RESOLVED', type(layer).__name__)
    """)
    assert "RESOLVED DCNv2" in out


# A stand-in for mmcv-full's ``mmcv.ops``: it registers 'DCN' and 'DCNv2' in the root registry.
_STANDIN = '''
import importlib.abc, importlib.util, sys
SOURCE = """
from mmengine.registry import MODELS
from torch import nn

@MODELS.register_module('DCN')
class DeformConv2dPack(nn.Module):
    pass

@MODELS.register_module('DCNv2')
class ModulatedDeformConv2dPack(nn.Module):
    pass
"""

class StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == 'mmcv.ops' else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(SOURCE, module.__dict__)

sys.meta_path.insert(0, StandIn())
'''


@pytest.mark.parametrize("order", ["mmcv_ops_first", "dcn_plugin_first"])
def test_import_orders_with_mmcv_full_standin(order):
    if order == "mmcv_ops_first":
        imports = "import mmcv.ops\nimport dcn_plugin.layers\n"
    else:  # through custom_imports, then mmcv-full's ops are imported by the user
        imports = textwrap.dedent("""
            from mmengine.config import Config
            Config.fromstring("custom_imports = dict(imports=['dcn_plugin'])", '.py')
            import mmcv.ops
        """)
    out = _run(_STANDIN + imports + textwrap.dedent("""
        import mmcv.ops
        from mmcv.cnn import ConvModule, build_conv_layer
        from dcn_plugin.layers import LAYERS
        assert mmcv.ops.DeformConv2dPack.__module__ == 'mmcv.ops'
        for name, cls in LAYERS.items():
            assert type(build_conv_layer(dict(type=name), 4, 8, 3)) is cls, name
            assert type(ConvModule(4, 8, 3, conv_cfg=dict(type=name), norm_cfg=dict(type='BN')).conv) is cls
        print('ORDER OK')
    """))
    assert "ORDER OK" in out
    lines = [line for line in out.splitlines() if "are served by dcn_plugin.layers" in line]
    assert len(lines) == 1, out
    assert "DCN (was mmcv.ops.DeformConv2dPack)" in lines[0]
    assert "DCNv2 (was mmcv.ops.ModulatedDeformConv2dPack)" in lines[0]


# ---- drop-in for mmcv-full's checkpoints ----------------------------------------------------


def _mmcv_state_dict(modulated: bool, in_channels=4, out_channels=6, k=3, deform_groups=2, groups=1):
    """A state_dict laid out as mmcv-full's DeformConv2dPack / ModulatedDeformConv2dPack write it."""
    g = torch.Generator().manual_seed(0)
    gen_channels = (3 if modulated else 2) * deform_groups * k * k
    sd = OrderedDict()
    sd["weight"] = torch.randn(out_channels, in_channels // groups, k, k, generator=g, dtype=DTYPE)
    if modulated:  # ModulatedDeformConv2d has a bias by default; DeformConv2d never has one
        sd["bias"] = torch.randn(out_channels, generator=g, dtype=DTYPE)
    sd["conv_offset.weight"] = 0.3 * torch.randn(gen_channels, in_channels, k, k, generator=g, dtype=DTYPE)
    sd["conv_offset.bias"] = 0.3 * torch.randn(gen_channels, generator=g, dtype=DTYPE)
    sd._metadata = OrderedDict([("", {"version": 2}), ("conv_offset", {"version": 1})])
    return sd


def _mmcv_expected(sd, x, modulated, stride=1, padding=1, dilation=1, groups=1):
    """mmcv-full's forward, written out: generator conv, mmcv's split, the reference op."""
    out = F.conv2d(x, sd["conv_offset.weight"], sd["conv_offset.bias"], stride, padding, dilation)
    mask = None
    if modulated:
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
    else:
        offset = out
    return deform_conv_reference(x, sd["weight"], offset, mask, sd.get("bias"), stride, padding, dilation,
                                 groups)


@pytest.mark.parametrize("modulated", [False, True], ids=["DCN", "DCNv2"])
def test_mmcv_full_state_dict_loads_strict_and_matches(modulated):
    sd = _mmcv_state_dict(modulated)
    cls = layers.DCNv2 if modulated else layers.DCN
    layer = cls(4, 6, 3, stride=1, padding=1, dilation=1, groups=1, deform_groups=2).double()
    assert set(layer.state_dict()) == set(sd)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    assert layer.state_dict()._metadata[""]["version"] == 2
    layer.load_state_dict(sd, strict=True)
    x = torch.randn(2, 4, 9, 8, dtype=DTYPE)
    expected = _mmcv_expected(sd, x, modulated)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(layer(x), expected, **TOL)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = layers.DCNv2(4, 6, 3, padding=1, deform_groups=2)


def _version1_state_dict():
    """A block's state_dict as early mmcv wrote it: the offset conv beside the layer."""
    layer_sd = _mmcv_state_dict(modulated=True)
    sd = OrderedDict(conv1_w=None)
    sd.clear()
    g = torch.Generator().manual_seed(1)
    sd["conv1.weight"] = torch.randn(4, 4, 1, 1, generator=g, dtype=DTYPE)
    sd["conv1.bias"] = torch.randn(4, generator=g, dtype=DTYPE)
    sd["conv2.weight"] = layer_sd["weight"]
    sd["conv2.bias"] = layer_sd["bias"]
    sd["conv2_offset.weight"] = layer_sd["conv_offset.weight"]
    sd["conv2_offset.bias"] = layer_sd["conv_offset.bias"]
    sd._metadata = OrderedDict([("", {"version": 1}), ("conv1", {"version": 1}), ("conv2", {"version": 1}),
                                ("conv2_offset", {"version": 1})])
    return sd, layer_sd


def _check_block(block, layer_sd):
    x = torch.randn(1, 4, 6, 6, dtype=DTYPE)
    torch.testing.assert_close(block.conv2(x), _mmcv_expected(layer_sd, x, modulated=True), **TOL)


def test_version1_layout_plain_torch_load_fails():
    block = _Block().double()
    with pytest.raises(RuntimeError, match="conv2_offset"):
        block.load_state_dict(_version1_state_dict()[0], strict=True)


def test_in_layer_version1_upgrade_as_mmcv():
    # mmcv's own path: fires when the layer is handed the whole state_dict (torch < 2 did that).
    sd, layer_sd = _version1_state_dict()
    block = _Block().double()
    missing, unexpected, errors = [], [], []
    block.conv2._load_from_state_dict(sd, "conv2.", {"version": 1}, True, missing, unexpected, errors)
    assert not missing and not errors
    assert "conv2_offset.weight" not in sd and "conv2_offset.bias" not in sd
    assert sd["conv2.conv_offset.weight"] is layer_sd["conv_offset.weight"]


@pytest.mark.parametrize("path", ["function", "hook", "converter", "mmengine_loader"])
def test_version1_layout_loads(path, tmp_path):
    sd, layer_sd = _version1_state_dict()
    block = _Block().double()
    if path == "function":
        assert upgrade_dcn_state_dict(sd, block) == ["conv2"]
        block.load_state_dict(sd, strict=True)
    elif path == "hook":
        register_dcn_upgrade_hook(block)
        block.load_state_dict(sd, strict=True)
    elif path == "converter":
        spec = importlib.util.spec_from_file_location(
            "convert_mmcv_dcn_checkpoint", os.path.join(ROOT, "tools", "convert_mmcv_dcn_checkpoint.py"))
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        torch.save({"state_dict": sd, "meta": {"epoch": 3}}, tmp_path / "old.pth")
        assert tool.main([str(tmp_path / "old.pth"), str(tmp_path / "new.pth")]) == 0
        new = torch.load(tmp_path / "new.pth", weights_only=False)
        assert new["meta"] == {"epoch": 3} and "conv2.conv_offset.weight" in new["state_dict"]
        block.load_state_dict(new["state_dict"], strict=True)
    else:  # mmengine's loader (used by load_checkpoint / the Runner), with the hook
        register_dcn_upgrade_hook(block)
        mmengine_load_state_dict(block, sd, strict=True)
    _check_block(block, layer_sd)


# ---- initialisation ----------------------------------------------------------------------------


def _generators(module):
    return [m for m in module.modules() if isinstance(m, layers.DeformGenerator)]


def test_init_weights_keeps_generators_zero():
    class Parent(BaseModule):
        def __init__(self):
            super().__init__(init_cfg=[dict(type="Kaiming", layer=["Conv1d", "Conv2d", "Conv3d"]),
                                       dict(type="Normal", std=1.0, layer="Linear")])
            self.plain = nn.Conv2d(4, 4, 3)
            self.dcn = layers.DCNv2(4, 4, 3)  # a direct child: its init_weights is called
            self.block = ConvModule(4, 4, 3, conv_cfg=dict(type="DCN"), norm_cfg=dict(type="BN"))
            self.seq = nn.Sequential(layers.DCN3d(4, 4, 3), layers.DCNTranspose1d(4, 4, 3, modulated=True))

    parent = Parent()
    gens = _generators(parent)
    assert len(gens) == 4
    with torch.no_grad():
        parent.plain.weight.zero_()
        parent.dcn.conv_offset.weight.fill_(1.0)  # init_weights must re-zero it
    parent.init_weights()
    assert parent.plain.weight.abs().sum() > 0  # the initialiser ran
    for gen in gens:
        assert not gen.weight.any() and not gen.bias.any()
    # The classic loop over isinstance(m, nn.Conv2d) leaves them alone too.
    for m in parent.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    assert not any(gen.weight.any() for gen in gens)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_at_initialisation_equals_plain_conv(name):
    n = _dim(name)
    layer = LAYERS[name](4, 6, 3, stride=2, padding=1, dilation=1, groups=2, deform_groups=2,
                         bias=True).double()
    x = torch.randn(2, 4, *[7] * n, dtype=DTYPE)
    bias = layer.bias
    if "Transpose" in name:
        plain = getattr(F, f"conv_transpose{n}d")(x, layer.weight, None, 2, 1, 0, 2)
    else:
        plain = getattr(F, f"conv{n}d")(x, layer.weight, None, 2, 1, 1, 2)
    scale = {False: 1.0, "sigmoid": 0.5, "softmax": 1.0 / 3 ** n}
    key = False if not layer.modulated else ("softmax" if name == "DCNv3" else "sigmoid")
    expected = scale[key] * plain + bias.reshape(1, -1, *[1] * n)
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_defaults_follow_mmcv():
    assert layers.DCN(4, 4, 3).bias is None  # DeformConv2d: no bias
    assert layers.DCNv2(4, 4, 3).bias is not None  # ModulatedDeformConv2d: bias=True
    assert layers.DCN(4, 4, 3, bias=True).bias is not None
    v3 = layers.DCNv3(4, 4, 3, deform_groups=2, mask_groups=4)
    assert v3.conv_offset.weight.shape[0] == 2 * 2 * 9 + 4 * 9
    x = torch.randn(1, 4, 5, 5)
    _randomise_generators(v3)
    _, mask = v3.offset_mask(x)
    torch.testing.assert_close(mask.unflatten(1, (4, 9)).sum(2), torch.ones(1, 4, 3, 3))
    assert math.isclose(layers.DCN(4, 4, 3, im2col_step=64).deform_groups, 1)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_reset_parameters_and_init_weights_zero_the_generator(name):
    for reset in ("reset_parameters", "init_weights"):
        layer = LAYERS[name](4, 4, 3, padding=1)
        _randomise_generators(layer)
        weight = layer.weight.detach().clone()
        getattr(layer, reset)()
        assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any(), reset
        assert reset == "reset_parameters" or torch.equal(layer.weight, weight)  # init_weights keeps it


# ---- mmcv's legacy and ignored constructor arguments ---------------------------------------


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_legacy_deformable_groups_as_mmcv(name):
    """mmcv's ``deformable_groups``: mmcv's DeprecationWarning, the meaning of ``deform_groups``."""
    with pytest.warns(DeprecationWarning, match=f'"deformable_groups" is deprecated in `{name}.__init__`, '
                                                'please use "deform_groups" instead'):
        legacy = LAYERS[name](4, 4, 3, padding=1, deformable_groups=2)
    current = LAYERS[name](4, 4, 3, padding=1, deform_groups=2)
    assert legacy.deform_groups == current.deform_groups == 2
    assert {k: v.shape for k, v in legacy.state_dict().items()} == \
        {k: v.shape for k, v in current.state_dict().items()}
    with pytest.raises(TypeError, match=f"{name}: got deform_groups=2 and its legacy name deformable_groups"):
        LAYERS[name](4, 4, 3, deform_groups=2, deformable_groups=2)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_unknown_keyword_names_the_layer_and_the_keyword(name):
    message = rf"{name}\.__init__\(\) got an unexpected keyword argument 'deform_group'"
    with pytest.raises(TypeError, match=message):
        LAYERS[name](4, 4, 3, deform_group=2)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_im2col_step_is_accepted_and_has_no_effect(name):
    torch.manual_seed(0)
    plain = LAYERS[name](4, 4, 3, padding=1).double()
    stepped = LAYERS[name](4, 4, 3, 1, 1, 1, 1, 1, None, 64).double()  # positional, as mmcv orders them
    _randomise_generators(plain)
    stepped.load_state_dict(plain.state_dict())
    x = _input(name)
    torch.testing.assert_close(stepped(x), plain(x), rtol=0, atol=0)


def test_mmdetection_legacy_configs_build_through_conv_module():
    """tood's and solov2's configs pass ``deformable_groups=1`` in ``conv_cfg``/``dcn``."""
    with pytest.warns(DeprecationWarning, match="deformable_groups"):
        module = ConvModule(4, 8, 3, padding=1, conv_cfg=dict(type="DCNv2", deformable_groups=1),
                            norm_cfg=dict(type="GN", num_groups=4))
    assert isinstance(module.conv, layers.DCNv2) and module.conv.deform_groups == 1
    module(torch.randn(1, 4, 6, 6)).sum().backward()
