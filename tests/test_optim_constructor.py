"""``paramwise_cfg=dict(dcn_offset_lr_mult=...)`` reaches dcn_plugin's offset/mask generators.

Oracle: mmengine's own ``DefaultOptimWrapperConstructor``. Every parameter that is not a generator's
gets exactly the learning rate and weight decay mmengine gives it; the generators get
``lr * dcn_offset_lr_mult`` and, as mmengine treats a DCN module's children, the base weight decay
(neither ``bias_*_mult`` nor ``flat_decay_mult``). Where mmcv-full is installed, the same model built
from mmcv's ``DeformConv2dPack`` gets the same groups from mmengine itself.
"""

from __future__ import annotations

import pytest
from extras import require
from torch import nn

require("mmengine")

from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import dcn_plugin.layers as layers  # noqa: E402
from dcn_plugin import ops  # noqa: E402

PARAMWISE = dict(dcn_offset_lr_mult=0.1, bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0)
LR, WD = 0.01, 1e-4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dcn = layers.DCN(4, 4, 3, padding=1, bias=True)
        self.head = nn.Sequential(layers.DCNv2(4, 4, 3, padding=1), layers.DCN3d(4, 4, 1))
        self.packed = ops.PackedDeformConv2d(4, 4, 3, padding=1, modulated=True)
        self.up = layers.DCNTranspose2d(4, 4, 2, stride=2, modulated=True)


def _groups(model: nn.Module, optim_wrapper: dict) -> dict:
    """Parameter name -> (lr, weight_decay) of the optimizer's groups."""
    optimizer = build_optim_wrapper(model, optim_wrapper).optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def _config(**extra) -> dict:
    return dict(optimizer=dict(type="SGD", lr=LR, momentum=0.9, weight_decay=WD),
                paramwise_cfg=dict(PARAMWISE), **extra)


def _is_generator(name: str) -> bool:
    return ".conv_offset." in name or ".conv_mask." in name


def _check(groups: dict, mmengine_groups: dict) -> None:
    generators = [n for n in groups if _is_generator(n)]
    assert len(generators) == 12  # weight and bias of six generators
    for name, (lr, wd) in groups.items():
        if _is_generator(name):
            assert (lr, wd) == (pytest.approx(LR * 0.1), WD), name
        else:
            assert (lr, wd) == mmengine_groups[name], name
    # the rest really differs from the generators' treatment: mmengine's rules are live here
    assert groups["stem.bias"] == (LR * 2.0, 0.0) and groups["bn.weight"] == (LR, 0.0)


def test_no_extra_key_with_the_dcn_plugin_scope():
    model = Net()
    mmengine_groups = _groups(model, _config())  # mmengine's constructor, no scope
    with DefaultScope.overwrite_default_scope("dcn_plugin"):
        groups = _groups(model, _config())
    _check(groups, mmengine_groups)


def test_one_documented_key_in_another_scope():
    model = Net()
    mmengine_groups = _groups(model, _config())
    with DefaultScope.overwrite_default_scope("mmengine"):
        groups = _groups(model, _config(constructor="dcn_plugin.DCNOptimWrapperConstructor"))
    _check(groups, mmengine_groups)


def test_custom_keys_win_over_the_generator_rule():
    model = Net()
    config = _config(constructor="dcn_plugin.DCNOptimWrapperConstructor")
    config["paramwise_cfg"]["custom_keys"] = {"dcn.conv_offset": dict(lr_mult=3.0)}
    groups = _groups(model, config)
    assert groups["dcn.conv_offset.weight"][0] == pytest.approx(LR * 3.0)
    assert groups["head.0.conv_offset.weight"][0] == pytest.approx(LR * 0.1)


def test_without_the_key_nothing_changes():
    model = Net()
    config = _config()
    del config["paramwise_cfg"]["dcn_offset_lr_mult"]
    mmengine_groups = _groups(model, config)
    with DefaultScope.overwrite_default_scope("dcn_plugin"):
        groups = _groups(model, config)
    for name, (lr, wd) in groups.items():
        if _is_generator(name):  # a DCN module's children: mmengine leaves their bias rules out
            assert (lr, wd) == (LR, WD), name
        else:
            assert (lr, wd) == mmengine_groups[name], name


def test_same_groups_as_mmengine_gives_mmcv_full_layers():
    """mmengine's own rule on mmcv-full's DeformConv2dPack, against ours on DCN, by parameter name."""
    require("mmcv.ops")
    from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack

    def net(dcn, dcnv2):
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), dcn(4, 4, 3), dcnv2(4, 4, 3))

    mmcv_groups = _groups(net(DeformConv2dPack, ModulatedDeformConv2dPack), _config())
    groups = _groups(net(layers.DCN, layers.DCNv2),
                     _config(constructor="dcn_plugin.DCNOptimWrapperConstructor"))
    assert groups == mmcv_groups
