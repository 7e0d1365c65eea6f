"""ResNet backbone with deformable convolutions in chosen stages (mmdet's ``ResNet`` semantics).

Module names and state_dict keys are those of mmdet's / torchvision's ResNet (``conv1``, ``bn1``,
``layer1.0.conv2``, ``layer1.0.downsample.0``, ...), so ``init_cfg=dict(type='Pretrained',
checkpoint='torchvision://resnet50')`` and mmdet checkpoints load unchanged. A deformable conv
(``dcn=dict(type='DCNv2', ...)``) keeps the key ``conv2.weight`` and adds ``conv2.conv_offset.*``,
which start at zero, so a plain checkpoint loaded with ``strict=False`` gives a network that starts
as the plain one (``DCN``), or as it with the deformable 3x3 convs scaled by ``sigmoid(0) = 0.5``
(``DCNv2``).

Differences from mmdet, on purpose:

- ``BasicBlock`` (depth 18/34) supports ``dcn``, on ``conv1`` (the 3x3 conv that carries the
  block's stride); mmdet asserts ``dcn is None`` there.
- ``dcn['fallback_on_stride'] = True`` keeps a plain conv exactly in the blocks whose deformable
  conv would be strided, as the name says. mmdet pops the key from the dict shared by the blocks
  (so it only reaches the first block built) and then falls back whatever the stride.
- The config dicts passed in are never mutated.
- Invalid arguments raise ``ValueError`` / ``TypeError`` naming the argument (mmdet asserts).
- ``plugins`` are not supported.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence, Tuple

import torch.utils.checkpoint as cp
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model import BaseModule, Sequential
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...registry import MODELS
from ..config_utils import copy_cfg

__all__ = ["BasicBlock", "Bottleneck", "ResLayer", "ResNet", "ResNetV1d"]


def _strided_conv_cfg(dcn: Optional[dict], conv_cfg: Optional[dict], stride: int) -> Optional[dict]:
    """Config of a block's 3x3 conv that carries its stride: ``dcn`` less ``fallback_on_stride``,
    or ``conv_cfg`` where there is no ``dcn`` or where ``dcn`` falls back and the conv is strided."""
    if dcn is None:
        return conv_cfg
    cfg = copy.deepcopy(dcn)
    fallback_on_stride = cfg.pop("fallback_on_stride", False)
    if "type" not in cfg:
        raise ValueError(f"dcn must have a 'type', e.g. dict(type='DCNv2'), got dcn={dcn!r}")
    if fallback_on_stride and stride != 1:
        return conv_cfg
    return cfg


class _ResBlock(BaseModule):
    """What :class:`BasicBlock` and :class:`Bottleneck` share: norms by index (named ``bn1``,
    ``gn1``, ... by mmcv's ``build_norm_layer``, reachable as ``norm1``, ...), the identity branch
    and activation checkpointing (``with_cp``)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, style: str, with_cp: bool,
                 conv_cfg: Optional[dict], norm_cfg: Optional[dict], dcn: Optional[dict], init_cfg) -> None:
        super().__init__(init_cfg=init_cfg)
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got style={style!r}")
        self.inplanes = inplanes
        self.planes = planes
        self.stride = stride
        self.dilation = dilation
        self.style = style
        self.with_cp = with_cp
        self.conv_cfg = copy_cfg(conv_cfg, "conv_cfg")
        self.norm_cfg = copy_cfg(norm_cfg, "norm_cfg") or dict(type="BN")
        self.dcn = copy_cfg(dcn, "dcn")

    def _add_tail(self, downsample: Optional[nn.Module]) -> None:
        # After the convs and norms, so that the state_dict order is mmdet's / torchvision's.
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def _add_norm(self, index: int, channels: int) -> None:
        name, norm = build_norm_layer(self.norm_cfg, channels, postfix=index)
        setattr(self, f"norm{index}_name", name)
        self.add_module(name, norm)

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    @property
    def norm2(self) -> nn.Module:
        return getattr(self, self.norm2_name)

    def _residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        def inner(x: Tensor) -> Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            return self._residual(x) + identity

        if self.with_cp and self.training and x.requires_grad:
            out = cp.checkpoint(inner, x, use_reentrant=False)
        else:
            out = inner(x)
        return self.relu(out)


class BasicBlock(_ResBlock):
    """Two 3x3 convs (ResNet-18/34). The stride and, with ``dcn``, the deformable conv are on
    ``conv1``; ``style`` makes no difference here."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, style: str = "pytorch", with_cp: bool = False,
                 conv_cfg: Optional[dict] = None, norm_cfg: Optional[dict] = None,
                 dcn: Optional[dict] = None, init_cfg=None) -> None:
        super().__init__(inplanes, planes, stride, dilation, style, with_cp, conv_cfg, norm_cfg, dcn,
                         init_cfg)
        conv1_cfg = _strided_conv_cfg(self.dcn, self.conv_cfg, stride)
        self.with_dcn = self.dcn is not None and conv1_cfg is not self.conv_cfg
        self.conv1 = build_conv_layer(conv1_cfg, inplanes, planes, 3, stride=stride, padding=dilation,
                                      dilation=dilation, bias=False)
        self._add_norm(1, planes)
        self.conv2 = build_conv_layer(self.conv_cfg, planes, planes, 3, padding=1, bias=False)
        self._add_norm(2, planes)
        self._add_tail(downsample)

    def _residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(out))


class Bottleneck(_ResBlock):
    """1x1 - 3x3 - 1x1 convs (ResNet-50/101/152), ``expansion = 4``. ``style='pytorch'`` puts the
    stride on the 3x3 ``conv2``, ``'caffe'`` on the first 1x1 ``conv1``; with ``dcn``, ``conv2`` is
    deformable."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, style: str = "pytorch", with_cp: bool = False,
                 conv_cfg: Optional[dict] = None, norm_cfg: Optional[dict] = None,
                 dcn: Optional[dict] = None, init_cfg=None) -> None:
        super().__init__(inplanes, planes, stride, dilation, style, with_cp, conv_cfg, norm_cfg, dcn,
                         init_cfg)
        self.conv1_stride, self.conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = build_conv_layer(self.conv_cfg, inplanes, planes, 1, stride=self.conv1_stride,
                                      bias=False)
        self._add_norm(1, planes)
        conv2_cfg = _strided_conv_cfg(self.dcn, self.conv_cfg, self.conv2_stride)
        self.with_dcn = self.dcn is not None and conv2_cfg is not self.conv_cfg
        self.conv2 = build_conv_layer(conv2_cfg, planes, planes, 3, stride=self.conv2_stride,
                                      padding=dilation, dilation=dilation, bias=False)
        self._add_norm(2, planes)
        self.conv3 = build_conv_layer(self.conv_cfg, planes, planes * self.expansion, 1, bias=False)
        self._add_norm(3, planes * self.expansion)
        self._add_tail(downsample)

    @property
    def norm3(self) -> nn.Module:
        return getattr(self, self.norm3_name)

    def _residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        return self.norm3(self.conv3(out))


class ResLayer(Sequential):
    """One stage: ``num_blocks`` blocks, the first with the stride and a projection shortcut
    (``downsample``: 1x1 conv + norm, or with ``avg_down`` an average pool then a 1x1 conv) where
    the stride or the width changes. ``block_kwargs`` go to every block."""

    def __init__(self, block: type, inplanes: int, planes: int, num_blocks: int, stride: int = 1,
                 avg_down: bool = False, conv_cfg: Optional[dict] = None,
                 norm_cfg: Optional[dict] = None, **block_kwargs) -> None:
        norm_cfg = norm_cfg if norm_cfg is not None else dict(type="BN")
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or inplanes != out_planes:
            layers = []
            conv_stride = stride
            if avg_down:
                # Kept even when stride is 1 (an identity), so that the keys are mmdet's.
                conv_stride = 1
                layers.append(nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True,
                                           count_include_pad=False))
            layers.append(build_conv_layer(conv_cfg, inplanes, out_planes, 1, stride=conv_stride, bias=False))
            layers.append(build_norm_layer(norm_cfg, out_planes)[1])
            downsample = nn.Sequential(*layers)
        blocks = [block(inplanes, planes, stride=stride, downsample=downsample, conv_cfg=conv_cfg,
                        norm_cfg=norm_cfg, **block_kwargs)]
        blocks += [block(out_planes, planes, stride=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, **block_kwargs)
                   for _ in range(1, num_blocks)]
        super().__init__(*blocks)


@MODELS.register_module()
class ResNet(BaseModule):
    """ResNet backbone, mmdet's arguments and semantics, with deformable convs where asked.

    Args:
        depth: 18, 34 (:class:`BasicBlock`), 50, 101 or 152 (:class:`Bottleneck`).
        in_channels: input image channels.
        stem_channels: width of the stem; defaults to ``base_channels``.
        base_channels: width of stage 0 before expansion; stage ``i`` outputs
            ``base_channels * 2**i * expansion`` channels.
        num_stages: 1 to 4.
        strides, dilations: per stage, ``num_stages`` of each.
        out_indices: stages whose outputs ``forward`` returns (in stage order, as mmdet).
        style: ``'pytorch'`` (stride on the 3x3 conv) or ``'caffe'`` (on the first 1x1 conv).
        deep_stem: three 3x3 convs instead of the 7x7 one.
        avg_down: average-pool then 1x1 conv in the projection shortcuts.
        frozen_stages: -1: none; 0: the stem; ``k``: the stem and stages 1..k (``layer1``..). Frozen
            parts have ``requires_grad=False`` and stay in eval mode through ``train()``.
        conv_cfg, norm_cfg: for mmcv's ``build_conv_layer`` / ``build_norm_layer``.
        norm_eval: keep every BatchNorm in eval mode (frozen statistics) in ``train()``.
        dcn: config of the deformable conv, e.g. ``dict(type='DCNv2', deform_groups=1,
            fallback_on_stride=False)``; used in the stages where ``stage_with_dcn`` is True, for
            every block's 3x3 conv that carries the block's stride (Bottleneck ``conv2``,
            BasicBlock ``conv1``), except, with ``fallback_on_stride=True``, where that conv is
            strided.
        stage_with_dcn: ``num_stages`` booleans.
        with_cp: activation checkpointing in the blocks (training, input that requires grad).
        zero_init_residual: with the default ``init_cfg``, the last norm of each block starts at 0.
        pretrained: deprecated; a checkpoint path, same as ``init_cfg=dict(type='Pretrained',
            checkpoint=pretrained)``.
        init_cfg: mmengine init config; None means Kaiming (fan_out, relu, normal) for ``Conv2d``
            and 1/0 for the norms (deformable convs keep their own init, and their offset
            generators stay zero).

    Attributes:
        block: the block class; ``stage_blocks``: blocks per stage; ``res_layers``: stage names.
        stage_channels: output channels of every stage; ``out_channels``: of the returned maps
            (in stage order), e.g. the ``in_channels`` of an FPN; ``feat_dim``: of the last
            stage.
    """

    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(self, depth: int, in_channels: int = 3, stem_channels: Optional[int] = None,
                 base_channels: int = 64, num_stages: int = 4, strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1), out_indices: Sequence[int] = (0, 1, 2, 3),
                 style: str = "pytorch", deep_stem: bool = False, avg_down: bool = False,
                 frozen_stages: int = -1, conv_cfg: Optional[dict] = None,
                 norm_cfg: Optional[dict] = dict(type="BN", requires_grad=True),  # noqa: B006 (never mutated)
                 norm_eval: bool = True, dcn: Optional[dict] = None,
                 stage_with_dcn: Sequence[bool] = (False, False, False, False), with_cp: bool = False,
                 zero_init_residual: bool = True, pretrained: Optional[str] = None, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)  # BaseModule stores a deep copy
        if depth not in self.arch_settings:
            raise KeyError(f"invalid depth={depth!r} for ResNet, expected one of "
                           f"{sorted(self.arch_settings)}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be in 1..4, got num_stages={num_stages!r}")
        strides, dilations = tuple(strides), tuple(dilations)
        stage_with_dcn, out_indices = tuple(stage_with_dcn), tuple(out_indices)
        per_stage = (("strides", strides), ("dilations", dilations), ("stage_with_dcn", stage_with_dcn))
        for name, value in per_stage:
            if len(value) != num_stages:
                raise ValueError(f"{name} must have num_stages={num_stages} entries, got {name}={value!r}")
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices must be non-empty stage indices in 0..{num_stages - 1}, "
                             f"got out_indices={out_indices!r}")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be in -1..{num_stages}, "
                             f"got frozen_stages={frozen_stages!r}")
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got style={style!r}")
        dcn = copy_cfg(dcn, "dcn")
        if dcn is not None and "type" not in dcn:
            raise ValueError(f"dcn must have a 'type', e.g. dict(type='DCNv2'), got dcn={dcn!r}")

        if init_cfg is not None and pretrained is not None:
            raise ValueError("init_cfg and pretrained cannot be specified at the same time")
        block_init_cfg = None
        if isinstance(pretrained, str):
            warnings.warn("pretrained is deprecated, use init_cfg=dict(type='Pretrained', "
                          "checkpoint=...) instead", FutureWarning, stacklevel=2)
            self.init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        elif pretrained is not None:
            raise TypeError(f"pretrained must be a str or None, got pretrained={pretrained!r}")
        elif init_cfg is None:
            self.init_cfg = [
                dict(type="Kaiming", layer="Conv2d"),
                dict(type="Constant", val=1, layer=["_BatchNorm", "GroupNorm"]),
            ]
            if zero_init_residual:
                last_norm = "norm2" if self.arch_settings[depth][0] is BasicBlock else "norm3"
                block_init_cfg = dict(type="Constant", val=0, override=dict(name=last_norm))
        self.pretrained = pretrained
        self.zero_init_residual = zero_init_residual

        self.depth = depth
        self.in_channels = in_channels
        self.stem_channels = base_channels if stem_channels is None else stem_channels
        self.base_channels = base_channels
        self.num_stages = num_stages
        self.strides = strides
        self.dilations = dilations
        self.out_indices = out_indices
        self.style = style
        self.deep_stem = deep_stem
        self.avg_down = avg_down
        self.frozen_stages = frozen_stages
        self.conv_cfg = copy_cfg(conv_cfg, "conv_cfg")
        self.norm_cfg = copy_cfg(norm_cfg, "norm_cfg") or dict(type="BN", requires_grad=True)
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.dcn = dcn
        self.stage_with_dcn = stage_with_dcn
        self.block, stage_blocks = self.arch_settings[depth]
        self.stage_blocks = stage_blocks[:num_stages]

        self._make_stem_layer(in_channels, self.stem_channels)

        self.res_layers = []
        self.stage_channels = []
        inplanes = self.stem_channels
        for i, num_blocks in enumerate(self.stage_blocks):
            planes = base_channels * 2**i
            res_layer = self.make_res_layer(
                block=self.block, inplanes=inplanes, planes=planes, num_blocks=num_blocks,
                stride=strides[i], dilation=dilations[i], style=style, avg_down=avg_down, with_cp=with_cp,
                conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, dcn=dcn if stage_with_dcn[i] else None,
                init_cfg=block_init_cfg)
            inplanes = planes * self.block.expansion
            name = f"layer{i + 1}"
            self.add_module(name, res_layer)
            self.res_layers.append(name)
            self.stage_channels.append(inplanes)
        self.stage_channels = tuple(self.stage_channels)
        self.out_channels = tuple(c for i, c in enumerate(self.stage_channels) if i in out_indices)
        self.feat_dim = self.stage_channels[-1]

        self._freeze_stages()

    def make_res_layer(self, **kwargs) -> ResLayer:
        """Builds one stage (a hook for subclasses, as in mmdet)."""
        return ResLayer(**kwargs)

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    def _make_stem_layer(self, in_channels: int, stem_channels: int) -> None:
        if self.deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                build_conv_layer(self.conv_cfg, in_channels, half, 3, stride=2, padding=1, bias=False),
                build_norm_layer(self.norm_cfg, half)[1],
                nn.ReLU(inplace=True),
                build_conv_layer(self.conv_cfg, half, half, 3, stride=1, padding=1, bias=False),
                build_norm_layer(self.norm_cfg, half)[1],
                nn.ReLU(inplace=True),
                build_conv_layer(self.conv_cfg, half, stem_channels, 3, stride=1, padding=1, bias=False),
                build_norm_layer(self.norm_cfg, stem_channels)[1],
                nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = build_conv_layer(self.conv_cfg, in_channels, stem_channels, 7, stride=2, padding=3,
                                          bias=False)
            self.norm1_name, norm1 = build_norm_layer(self.norm_cfg, stem_channels, postfix=1)
            self.add_module(self.norm1_name, norm1)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            stem = [self.stem] if self.deep_stem else [self.conv1, self.norm1]
            for m in stem:
                m.eval()
                for param in m.parameters():
                    param.requires_grad = False
        for i in range(1, self.frozen_stages + 1):
            m = getattr(self, f"layer{i}")
            m.eval()
            for param in m.parameters():
                param.requires_grad = False

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.norm1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def train(self, mode: bool = True) -> ResNet:
        """Sets the mode, then re-freezes the frozen stages and, with ``norm_eval``, puts every
        BatchNorm back in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


@MODELS.register_module()
class ResNetV1d(ResNet):
    """ResNet-V1d (Bag of Tricks): deep stem and average-pool shortcuts; arguments as ResNet."""

    def __init__(self, **kwargs) -> None:
        super().__init__(deep_stem=True, avg_down=True, **kwargs)
