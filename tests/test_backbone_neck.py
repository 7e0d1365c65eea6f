"""Tests of the ResNet backbone (``dcn_plugin.models.backbones``) and the FPN neck
(``dcn_plugin.models.necks``).

Oracles: torchvision's ResNet layout (every parameter shape written out by hand below, and the
parameter totals torchvision documents), a plain network with the same weights (deformable convs
with zero offsets are plain convs; DCNv2's mask is ``sigmoid(0) = 0.5``), the same network without
checkpointing, and the FPN's top-down path recomputed by hand (nearest 2x upsampling as
``repeat_interleave``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from extras import require_detector  # noqa: E402
from torch import nn

require_detector()

import torch.utils.checkpoint  # noqa: E402
from mmcv.cnn import ConvModule  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import MODELS as ROOT_MODELS  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import dcn_plugin.models.backbones  # noqa: E402,F401  (registers ResNet)
import dcn_plugin.models.necks  # noqa: E402,F401  (registers FPN)
from dcn_plugin.layers import DCN, DCNv2, DeformGenerator  # noqa: E402
from dcn_plugin.models.backbones import BasicBlock, Bottleneck, ResNet, ResNetV1d  # noqa: E402
from dcn_plugin.models.necks import FPN  # noqa: E402
from dcn_plugin.registry import MODELS  # noqa: E402

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# torchvision's documented parameter counts of resnet{18,...,152}, less the 1000-class fc layer
# (in_features * 1000 + 1000).
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
TORCHVISION_BACKBONE_PARAMS = {d: n - (512 * (1 if d < 50 else 4) * 1000 + 1000)
                               for d, n in TORCHVISION_PARAMS.items()}


@pytest.fixture(autouse=True)
def _quiet_init_logs():
    """``init_weights`` logs one INFO record per parameter; keep the test output short."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel("WARNING")
    yield
    logger.setLevel(level)


def _torchvision_shapes(depth: int) -> dict:
    """Every state_dict entry of torchvision's ``resnet{depth}`` without ``fc``, by hand."""
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for key in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{key}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for s, n in enumerate(STAGE_BLOCKS[depth]):
        planes = 64 * 2**s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            cin = inplanes if b == 0 else planes * expansion
            if bottleneck:
                convs = [(planes, cin, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            else:
                convs = [(planes, cin, 3, 3), (planes, planes, 3, 3)]
            for i, shape in enumerate(convs, 1):
                shapes[f"{p}.conv{i}.weight"] = shape
                bn(f"{p}.bn{i}", shape[0])
            if b == 0 and (s > 0 or cin != planes * expansion):
                shapes[f"{p}.downsample.0.weight"] = (planes * expansion, cin, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
        inplanes = planes * expansion
    return shapes


def _n_params(shapes: dict) -> int:
    return sum(math.prod(s) for k, s in shapes.items() if k.rsplit(".", 1)[-1] in ("weight", "bias"))


def _dcn_names(model: nn.Module, cls=DCN) -> set:
    return {name for name, m in model.named_modules() if isinstance(m, cls)}


def _randomise(model: nn.Module, generators: bool = True, scale: float = 0.2) -> nn.Module:
    """Random norm affine parameters and running statistics (and offset generators), so that
    equalities below are not vacuous."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.3 * torch.rand(m.running_var.shape, generator=g))
            if generators and isinstance(m, DeformGenerator):
                m.weight.copy_(scale * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(scale * torch.randn(m.bias.shape, generator=g))
    return model


def _image(size: int = 64, batch: int = 1, dtype=torch.float32, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(dtype).requires_grad_(grad)


# ---- ResNet: layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", sorted(STAGE_BLOCKS))
def test_resnet_output_shapes(depth):
    model = ResNet(depth, base_channels=8).eval()
    expansion = 1 if depth < 50 else 4
    assert model.block is (BasicBlock if depth < 50 else Bottleneck)
    assert model.stage_blocks == STAGE_BLOCKS[depth]
    with torch.no_grad():
        outs = model(_image(64))
    expected = [(1, 8 * 2**i * expansion, 16 // 2**i, 16 // 2**i) for i in range(4)]
    assert [tuple(o.shape) for o in outs] == expected
    assert model.out_channels == model.stage_channels == tuple(e[1] for e in expected)
    assert model.feat_dim == expected[-1][1]


def test_resnet_out_indices_strides_dilations_and_num_stages():
    model = ResNet(50, base_channels=8, out_indices=(1, 3), strides=(1, 2, 2, 1),
                   dilations=(1, 1, 1, 2)).eval()
    with torch.no_grad():
        outs = model(_image(64))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 8, 8), (1, 256, 4, 4)]
    assert model.out_channels == (64, 256)
    conv2 = model.layer4[0].conv2
    assert conv2.dilation == (2, 2) and conv2.padding == (2, 2) and conv2.stride == (1, 1)

    model = ResNet(18, base_channels=8, num_stages=3, out_indices=(0, 2), stage_with_dcn=(False,) * 3,
                   strides=(1, 2, 2), dilations=(1, 1, 1)).eval()
    assert not hasattr(model, "layer4") and model.res_layers == ["layer1", "layer2", "layer3"]
    with torch.no_grad():
        outs = model(_image(64))
    assert [tuple(o.shape) for o in outs] == [(1, 8, 16, 16), (1, 32, 4, 4)]


@pytest.mark.parametrize("depth", sorted(STAGE_BLOCKS))
def test_resnet_matches_torchvision_layout(depth):
    shapes = _torchvision_shapes(depth)
    # The hand-written layout agrees with torchvision's documented totals ...
    assert _n_params(shapes) == TORCHVISION_BACKBONE_PARAMS[depth]
    # ... and so does ours, key by key (so torchvision / mmdet checkpoints load).
    with torch.device("meta"):
        model = ResNet(depth)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_BACKBONE_PARAMS[depth]


def test_resnet_param_counts_of_the_two_usual_depths():
    assert TORCHVISION_BACKBONE_PARAMS[50] == _n_params(_torchvision_shapes(50)) == 23_508_032
    assert TORCHVISION_BACKBONE_PARAMS[18] == _n_params(_torchvision_shapes(18)) == 11_176_512
    for depth in (18, 50):
        model = ResNet(depth, base_channels=64)
        assert sum(p.numel() for p in model.parameters()) == TORCHVISION_BACKBONE_PARAMS[depth]


def test_resnet_styles():
    pytorch = ResNet(50, base_channels=8, style="pytorch")
    caffe = ResNet(50, base_channels=8, style="caffe")
    assert pytorch.layer2[0].conv1.stride == (1, 1) and pytorch.layer2[0].conv2.stride == (2, 2)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    # same shapes either way
    assert {k: v.shape for k, v in pytorch.state_dict().items()} == \
        {k: v.shape for k, v in caffe.state_dict().items()}


def test_resnet_deep_stem_avg_down_and_v1d():
    model = ResNetV1d(depth=50, base_channels=8, stem_channels=16).eval()
    assert model.deep_stem and model.avg_down and not hasattr(model, "conv1")
    convs = [m for m in model.stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == \
        [(3, 8, (2, 2)), (8, 8, (1, 1)), (8, 16, (1, 1))]
    down = model.layer2[0].downsample
    assert isinstance(down[0], nn.AvgPool2d) and down[1].stride == (1, 1)
    assert isinstance(model.layer1[0].downsample[0], nn.AvgPool2d)  # kept at stride 1 (mmdet's keys)
    with torch.no_grad():
        outs = model(_image(64))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]


def test_resnet_from_registries():
    cfg = dict(type="ResNet", depth=18, base_channels=8, out_indices=(3,))
    frozen = copy.deepcopy(cfg)
    model = MODELS.build(cfg)
    assert type(model) is ResNet and model.out_channels == (64,)
    assert type(ROOT_MODELS.build(dict(cfg, type="dcn_plugin.ResNet"))) is ResNet
    assert type(ROOT_MODELS.build(dict(type="dcn_plugin.ResNetV1d", depth=18, base_channels=8))) is ResNetV1d
    assert cfg == frozen


# ---- ResNet: deformable convs -----------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("dcn_type", ["DCN", "DCNv2"])
@pytest.mark.parametrize("stage_with_dcn", [(False, True, True, True), (True, False, True, False)])
def test_resnet_dcn_in_chosen_stages(depth, dcn_type, stage_with_dcn):
    cls = {"DCN": DCN, "DCNv2": DCNv2}[dcn_type]
    dcn = dict(type=dcn_type, deform_groups=1, fallback_on_stride=False)
    model = ResNet(depth, base_channels=8, dcn=dcn, stage_with_dcn=stage_with_dcn)
    conv = "conv1" if depth < 50 else "conv2"  # the 3x3 conv that carries the stride
    expected = {f"layer{s + 1}.{b}.{conv}" for s, n in enumerate(STAGE_BLOCKS[depth]) if stage_with_dcn[s]
                for b in range(n)}
    assert _dcn_names(model) == expected
    assert all(type(model.get_submodule(name)) is cls for name in expected)
    for s, n in enumerate(STAGE_BLOCKS[depth]):
        layer = getattr(model, f"layer{s + 1}")
        assert sum(isinstance(m, DCN) for m in layer.modules()) == (n if stage_with_dcn[s] else 0)
        assert all(block.with_dcn == stage_with_dcn[s] for block in layer)
        first = getattr(layer[0], conv)
        assert first.stride == ((2, 2) if s > 0 else (1, 1))
    with torch.no_grad():
        outs = model.eval()(_image(64))
    assert [o.shape[1] for o in outs] == list(model.out_channels)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_dcn_fallback_on_stride(depth):
    dcn = dict(type="DCN", fallback_on_stride=True)
    model = ResNet(depth, base_channels=8, dcn=dcn, stage_with_dcn=(True,) * 4)
    conv = "conv1" if depth < 50 else "conv2"
    # every block but the strided first ones of stages 2..4
    expected = {f"layer{s + 1}.{b}.{conv}" for s, n in enumerate(STAGE_BLOCKS[depth])
                for b in range(n) if s == 0 or b > 0}
    assert _dcn_names(model) == expected
    for s in range(1, 4):
        first = getattr(getattr(model, f"layer{s + 1}")[0], conv)
        assert type(first) is nn.Conv2d and first.stride == (2, 2)
    if depth == 50:
        # caffe style: the stride is on the 1x1 conv1, so no conv2 is strided and none falls back
        caffe = ResNet(depth, base_channels=8, style="caffe", dcn=dcn, stage_with_dcn=(True,) * 4)
        assert len(_dcn_names(caffe)) == sum(STAGE_BLOCKS[depth])


def _plain_and_dcn(depth: int, dcn_type: str, **kwargs):
    torch.manual_seed(0)
    plain = _randomise(ResNet(depth, base_channels=8, **kwargs)).to(DTYPE).eval()
    stage_with_dcn = (True, True, False, True)
    deform = ResNet(depth, base_channels=8, dcn=dict(type=dcn_type), stage_with_dcn=stage_with_dcn,
                    **kwargs).to(DTYPE).eval()
    return plain, deform


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("dcn_type", ["DCN", "DCNv2"])
def test_resnet_dcn_with_zero_offsets_is_the_plain_resnet(depth, dcn_type):
    plain, deform = _plain_and_dcn(depth, dcn_type)
    state = plain.state_dict()
    names = _dcn_names(deform)
    assert names
    if dcn_type == "DCNv2":
        # the mask is sigmoid(0) = 0.5 at initialisation; twice the weights cancel it (no bias)
        state = {k: (2 * v if k.rsplit(".", 1)[0] in names else v) for k, v in state.items()}
    result = deform.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == {f"{n}.conv_offset.{k}" for n in names for k in ("weight", "bias")}
    x = _image(64, batch=2, dtype=DTYPE)
    with torch.no_grad():
        expected, got = plain(x), deform(x)
        for e, o in zip(expected, got):
            torch.testing.assert_close(o, e, **TOL)
        # the deformable convs are in the path: non-zero offsets change the output
        _randomise(deform, generators=True)
        deform.load_state_dict(state, strict=False)  # same weights and norms as plain again
        moved = deform(x)
    assert not torch.allclose(moved[-1], expected[-1])


def test_resnet_init_weights():
    dcn = dict(type="DCNv2", deform_groups=2)
    model = ResNet(50, base_channels=16, dcn=dcn, stage_with_dcn=(False, True, True, True))
    _randomise(model, generators=True)
    names = _dcn_names(model)
    assert len(names) == 13 and all(model.get_submodule(n).conv_offset.weight.any() for n in names)
    model.init_weights()
    for name in names:
        layer = model.get_submodule(name)
        assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    for layer in model.res_layers:
        for block in getattr(model, layer):
            # zero_init_residual: the block starts as the identity (its last norm is 0)
            assert not block.norm3.weight.any() and not block.norm3.bias.any()
            assert (block.norm1.weight == 1).all() and not block.norm1.bias.any()
            assert (block.norm2.weight == 1).all()
    assert (model.norm1.weight == 1).all() and (model.norm1.running_var != 1).any()  # stats untouched
    # Kaiming normal, fan_out, relu: std sqrt(2 / (out_channels * k * k))
    w = model.layer4[0].conv3.weight  # 512 x 128 x 1 x 1
    assert abs(w.std().item() / math.sqrt(2 / 512) - 1) < 0.05 and abs(w.mean().item()) < 1e-3
    assert model.layer1[0].conv1.bias is None

    basic = ResNet(18, base_channels=8)
    _randomise(basic)
    basic.init_weights()
    assert all(not block.norm2.weight.any() and (block.norm1.weight == 1).all()
               for layer in basic.res_layers for block in getattr(basic, layer))

    no_zero = ResNet(18, base_channels=8, zero_init_residual=False)
    no_zero.init_weights()
    assert all((m.weight == 1).all() for m in no_zero.modules() if isinstance(m, _BatchNorm))


def test_resnet_pretrained_and_init_cfg(tmp_path):
    source = _randomise(ResNet(18, base_channels=8))
    path = str(tmp_path / "r18.pth")
    torch.save(source.state_dict(), path)
    with pytest.warns(FutureWarning, match="pretrained"):
        model = ResNet(18, base_channels=8, pretrained=path)
    assert model.init_cfg == dict(type="Pretrained", checkpoint=path)
    model.init_weights()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)

    init_cfg = dict(type="Pretrained", checkpoint=path)
    frozen = copy.deepcopy(init_cfg)
    model = ResNet(18, base_channels=8, init_cfg=init_cfg)
    model.init_weights()
    assert init_cfg == frozen
    torch.testing.assert_close(model.layer4[1].bn2.weight, source.layer4[1].bn2.weight, rtol=0, atol=0)

    with pytest.raises(ValueError, match="pretrained"):
        ResNet(18, pretrained=path, init_cfg=init_cfg)
    with pytest.raises(TypeError, match="pretrained"):
        ResNet(18, pretrained=3)


# ---- ResNet: freezing, norm_eval, checkpointing -----------------------------------------------


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 3, 4])
@pytest.mark.parametrize("deep_stem", [False, True])
def test_resnet_frozen_stages(frozen_stages, deep_stem):
    model = ResNet(18, base_channels=8, frozen_stages=frozen_stages, norm_eval=False, deep_stem=deep_stem)
    model.train()
    stem = [model.stem] if deep_stem else [model.conv1, model.norm1]
    parts = [("stem", m) for m in stem] + [(i + 1, getattr(model, f"layer{i + 1}")) for i in range(4)]
    for key, module in parts:
        frozen = key == "stem" and frozen_stages >= 0 or key != "stem" and key <= frozen_stages
        assert all(p.requires_grad != frozen for p in module.parameters()), key
        assert all(m.training != frozen for m in module.modules()), key
    # the frozen parameters get no gradient
    x = _image(64, batch=2, grad=True)
    sum(o.sum() for o in model(x)).backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), name


def test_resnet_norm_eval():
    model = ResNet(50, base_channels=8, norm_eval=True, frozen_stages=-1)
    model.train()
    assert model.training and model.layer1[0].training and model.layer1[0].conv1.training
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(not m.training for m in bns)
    assert all(p.requires_grad for p in model.parameters())  # eval statistics, trainable affine
    before = [m.running_mean.clone() for m in bns]
    model(_image(64, batch=2))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    model.eval()
    model.train()
    assert all(not m.training for m in bns)

    model = ResNet(50, base_channels=8, norm_eval=False).train()
    assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))
    model = ResNet(18, base_channels=8, norm_cfg=dict(type="BN", requires_grad=False))
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, _BatchNorm)
                   for p in m.parameters())


@pytest.mark.parametrize("depth,dcn", [(18, None), (50, dict(type="DCNv2"))])
def test_resnet_with_cp_same_output_and_grads(depth, dcn, monkeypatch):
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    kwargs = dict(base_channels=8, dcn=dcn, stage_with_dcn=(False, True, True, True) if dcn else (False,) * 4)
    torch.manual_seed(0)
    ref = _randomise(ResNet(depth, with_cp=False, **kwargs)).to(DTYPE).train()
    cp_model = ResNet(depth, with_cp=True, **kwargs).to(DTYPE)
    cp_model.load_state_dict(ref.state_dict())
    cp_model.train()

    grads = []
    for model in (ref, cp_model):
        x = _image(64, batch=2, dtype=DTYPE).requires_grad_()
        outs = model(x)
        sum((o * o).sum() for o in outs).backward()
        grads.append((outs, x.grad, {n: p.grad for n, p in model.named_parameters()}))
    assert len(calls) == sum(STAGE_BLOCKS[depth]) and set(calls) == {False}
    (o1, gx1, gp1), (o2, gx2, gp2) = grads
    for a, b in zip(o1, o2):
        torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(gx2, gx1, **TOL)
    assert gp1.keys() == gp2.keys()
    for name in gp1:
        torch.testing.assert_close(gp2[name], gp1[name], **TOL, msg=name)
    if dcn:
        assert any(g.abs().sum() > 0 for n, g in gp2.items() if "conv_offset" in n)

    calls.clear()
    with torch.no_grad():
        cp_model.eval()(_image(64, dtype=DTYPE))
    assert not calls  # not in eval, nor without grad


# ---- ResNet: configs and errors ---------------------------------------------------------------


def test_resnet_does_not_mutate_configs():
    dcn = dict(type="DCN", deform_groups=1, fallback_on_stride=True)
    conv_cfg = dict(type="Conv2d")
    norm_cfg = dict(type="BN", requires_grad=True)
    init_cfg = [dict(type="Kaiming", layer="Conv2d"),
                dict(type="Constant", val=1, layer=["_BatchNorm"],
                     override=dict(type="Constant", name="layer1", val=0.5))]
    cfgs = (dcn, conv_cfg, norm_cfg, init_cfg)
    frozen = copy.deepcopy(cfgs)
    for depth in (18, 50):
        model = ResNet(depth, base_channels=8, dcn=dcn, stage_with_dcn=(True, True, False, True),
                       conv_cfg=conv_cfg, norm_cfg=norm_cfg)
        model.init_weights()
        model = ResNet(depth, base_channels=8, norm_cfg=norm_cfg, init_cfg=init_cfg)
        model.init_weights()
        assert (model.layer1[0].norm1.weight == 0.5).all() and (model.layer2[0].norm1.weight == 1).all()
        assert cfgs == frozen
    assert len(_dcn_names(ResNet(18, base_channels=8, dcn=dcn, stage_with_dcn=(True,) * 4))) == 8 - 3
    assert cfgs == frozen


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(depth=20), KeyError, "depth"),
    (dict(depth=18, stage_with_dcn=(False, True, True)), ValueError, "stage_with_dcn"),
    (dict(depth=18, num_stages=3), ValueError, "strides"),
    (dict(depth=18, num_stages=5), ValueError, "num_stages"),
    (dict(depth=18, dilations=(1, 1)), ValueError, "dilations"),
    (dict(depth=18, out_indices=(0, 4)), ValueError, "out_indices"),
    (dict(depth=18, out_indices=()), ValueError, "out_indices"),
    (dict(depth=18, frozen_stages=5), ValueError, "frozen_stages"),
    (dict(depth=50, style="tf"), ValueError, "style"),
    (dict(depth=50, dcn=dict(deform_groups=1), stage_with_dcn=(True,) * 4), ValueError, "dcn"),
    (dict(depth=50, dcn="DCN"), TypeError, "dcn"),
    (dict(depth=50, norm_cfg="BN"), TypeError, "norm_cfg"),
])
def test_resnet_errors_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        ResNet(**kwargs)


# ---- FPN --------------------------------------------------------------------------------------


IN_CHANNELS = [8, 16, 32, 64]


def _features(sizes=(32, 16, 8, 4), channels=IN_CHANNELS, dtype=DTYPE, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, s, s, generator=g).to(dtype).requires_grad_(grad)
            for c, s in zip(channels, sizes)]


def _up2(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


@pytest.mark.parametrize("add_extra_convs", [False, True, "on_input", "on_lateral", "on_output"])
@pytest.mark.parametrize("start_level", [0, 1])
def test_fpn_outputs(add_extra_convs, start_level):
    fpn = FPN(IN_CHANNELS, 16, num_outs=6, start_level=start_level, add_extra_convs=add_extra_convs,
              relu_before_extra_convs=True).to(DTYPE)
    fpn.init_weights()
    used = 4 - start_level
    assert fpn.add_extra_convs == ("on_input" if add_extra_convs is True else add_extra_convs)
    assert len(fpn.lateral_convs) == used
    assert len(fpn.fpn_convs) == (6 if add_extra_convs else used)
    if add_extra_convs:
        first_extra = fpn.fpn_convs[used].conv
        assert first_extra.stride == (2, 2)
        assert first_extra.in_channels == (64 if fpn.add_extra_convs == "on_input" else 16)
    feats = _features()
    with torch.no_grad():
        outs = fpn(feats)
        sizes = [32 // 2**i for i in range(start_level, 4)]
        while len(sizes) < 6:
            sizes.append(max(1, (sizes[-1] + 1) // 2))
        assert [tuple(o.shape) for o in outs] == [(2, 16, s, s) for s in sizes]

        # oracle: the top-down path and the extra levels recomputed by hand
        laterals = [conv(feats[i + start_level]) for i, conv in enumerate(fpn.lateral_convs)]
        for i in range(used - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _up2(laterals[i])
        expected = [fpn.fpn_convs[i](laterals[i]) for i in range(used)]
        for _ in range(used, 6):
            if not add_extra_convs:
                expected.append(expected[-1][..., ::2, ::2])
            elif len(expected) == used:
                source = {"on_input": feats[-1], "on_lateral": laterals[-1], "on_output": expected[-1]}
                expected.append(fpn.fpn_convs[used](source[fpn.add_extra_convs]))
            else:
                expected.append(fpn.fpn_convs[len(expected)](F.relu(expected[-1])))
        for o, e in zip(outs, expected):
            torch.testing.assert_close(o, e, **TOL)


def test_fpn_end_level_sizes_and_upsample_cfg():
    fpn = FPN(IN_CHANNELS, 8, num_outs=2, start_level=1, end_level=2)
    assert fpn.backbone_end_level == 3 and len(fpn.lateral_convs) == 2
    outs = fpn(_features(dtype=torch.float32))
    assert [tuple(o.shape) for o in outs] == [(2, 8, 16, 16), (2, 8, 8, 8)]
    # sizes that are not exact halves: each level is resized to the one below
    fpn = FPN(IN_CHANNELS, 8, num_outs=5)
    outs = fpn(_features(sizes=(25, 13, 7, 4), dtype=torch.float32))
    assert [o.shape[-1] for o in outs] == [25, 13, 7, 4, 2]
    fpn = FPN(IN_CHANNELS, 8, num_outs=4, upsample_cfg=dict(scale_factor=2, mode="nearest"))
    assert [o.shape[-1] for o in fpn(_features(dtype=torch.float32))] == [32, 16, 8, 4]


def test_fpn_with_dcn_conv_cfg():
    conv_cfg = dict(type="DCN")
    fpn = FPN(IN_CHANNELS, 16, num_outs=5, add_extra_convs="on_output", conv_cfg=conv_cfg).to(DTYPE)
    fpn.init_weights()
    dcns = _dcn_names(fpn)
    # mmdet's FPN passes conv_cfg to every conv: laterals, outputs and the extra one
    assert dcns == {f"lateral_convs.{i}.conv" for i in range(4)} | {f"fpn_convs.{i}.conv" for i in range(5)}
    assert all(not fpn.get_submodule(n).conv_offset.weight.any() for n in dcns)
    assert all(fpn.get_submodule(n).bias is not None for n in dcns)  # ConvModule bias='auto', no norm

    plain = FPN(IN_CHANNELS, 16, num_outs=5, add_extra_convs="on_output").to(DTYPE)
    plain.init_weights()
    result = fpn.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all("conv_offset" in k for k in result.missing_keys)
    feats = _features(grad=True)
    outs = fpn(feats)
    with torch.no_grad():
        for o, e in zip(outs, plain(feats)):
            torch.testing.assert_close(o, e, **TOL)  # zero offsets: the plain FPN
    sum((o * o).sum() for o in outs).backward()
    assert all(f.grad is not None for f in feats)
    for n in dcns:
        layer = fpn.get_submodule(n)
        assert layer.weight.grad is not None and layer.conv_offset.weight.grad is not None
    assert any(fpn.get_submodule(n).conv_offset.weight.grad.abs().sum() > 0 for n in dcns)


def test_fpn_with_group_norm():
    norm_cfg = dict(type="GN", num_groups=8, requires_grad=True)
    fpn = FPN(IN_CHANNELS, 16, num_outs=5, add_extra_convs="on_input", norm_cfg=norm_cfg,
              act_cfg=dict(type="ReLU"), conv_cfg=dict(type="DCN"))
    for block in list(fpn.lateral_convs) + list(fpn.fpn_convs):
        assert isinstance(block, ConvModule) and isinstance(block.gn, nn.GroupNorm)
        assert block.gn.num_groups == 8 and block.conv.bias is None
    outs = fpn(_features(dtype=torch.float32, grad=True))
    assert all((o >= 0).all() for o in outs)
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in fpn.parameters())

    no_lateral_norm = FPN(IN_CHANNELS, 16, num_outs=4, norm_cfg=norm_cfg, no_norm_on_lateral=True)
    assert all(not block.with_norm for block in no_lateral_norm.lateral_convs)
    assert all(block.with_norm for block in no_lateral_norm.fpn_convs)


def test_fpn_does_not_mutate_configs_and_builds_from_registries():
    conv_cfg = dict(type="DCNv2", deform_groups=2)
    norm_cfg = dict(type="GN", num_groups=8)
    act_cfg = dict(type="ReLU", inplace=True)
    upsample_cfg = dict(mode="nearest")
    init_cfg = dict(type="Xavier", layer="Conv2d", distribution="uniform")
    cfgs = (conv_cfg, norm_cfg, act_cfg, upsample_cfg, init_cfg)
    frozen = copy.deepcopy(cfgs)
    fpn = FPN(IN_CHANNELS, 16, 5, add_extra_convs=True, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
              act_cfg=act_cfg, upsample_cfg=upsample_cfg, init_cfg=init_cfg)
    fpn.init_weights()
    fpn(_features(dtype=torch.float32))
    assert cfgs == frozen
    assert len(_dcn_names(fpn, DCNv2)) == 9

    cfg = dict(type="FPN", in_channels=IN_CHANNELS, out_channels=8, num_outs=5, conv_cfg=conv_cfg)
    frozen = copy.deepcopy(cfg)
    assert type(MODELS.build(cfg)) is FPN
    assert type(ROOT_MODELS.build(dict(cfg, type="dcn_plugin.FPN"))) is FPN
    assert cfg == frozen


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(add_extra_convs="on_top"), ValueError, "add_extra_convs"),
    (dict(add_extra_convs=1), ValueError, "add_extra_convs"),
    (dict(num_outs=3), ValueError, "num_outs"),
    (dict(num_outs=5, start_level=1, end_level=2), ValueError, "num_outs"),
    (dict(start_level=4), ValueError, "start_level"),
    (dict(num_outs=2, start_level=2, end_level=1), ValueError, "end_level"),
    (dict(in_channels=64), TypeError, "in_channels"),
    (dict(in_channels=[]), TypeError, "in_channels"),
    (dict(conv_cfg="DCN"), TypeError, "conv_cfg"),
])
def test_fpn_errors_name_the_argument(kwargs, error, name):
    args = dict(in_channels=IN_CHANNELS, out_channels=8, num_outs=5)
    args.update(kwargs)
    with pytest.raises(error, match=name):
        FPN(**args)


def test_fpn_forward_checks_the_number_of_levels():
    fpn = FPN(IN_CHANNELS, 8, num_outs=5)
    with pytest.raises(ValueError, match="in_channels"):
        fpn(_features(dtype=torch.float32)[1:])


# ---- backbone + neck --------------------------------------------------------------------------


def test_dcn_resnet_with_fpn_trains():
    backbone = ResNet(50, base_channels=8, frozen_stages=1, dcn=dict(type="DCNv2", fallback_on_stride=False),
                      stage_with_dcn=(False, True, True, True))
    neck = FPN(list(backbone.out_channels), 16, num_outs=5, start_level=1, add_extra_convs="on_input",
               conv_cfg=dict(type="DCN"))
    backbone.init_weights()
    neck.init_weights()
    model = nn.Sequential(backbone, neck).train()
    outs = model(_image(64, batch=2))
    assert [tuple(o.shape) for o in outs] == [(2, 16, s, s) for s in (8, 4, 2, 1, 1)]
    sum(o.square().mean() for o in outs).backward()
    offset_grads = [backbone.get_submodule(n).conv_offset.weight.grad for n in _dcn_names(backbone)]
    assert len(offset_grads) == 13 and all(g is not None for g in offset_grads)
    assert backbone.layer1[0].conv1.weight.grad is None  # frozen
