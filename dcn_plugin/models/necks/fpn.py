"""Feature Pyramid Network (mmdet's ``FPN`` semantics, arguments and state_dict keys).

``conv_cfg`` reaches every conv, as in mmdet: ``conv_cfg=dict(type='DCN')`` makes the lateral 1x1,
the output 3x3 and the extra stride-2 convs deformable (our layers take any kernel size and a
bias). Differences from mmdet, on purpose: invalid arguments raise ``ValueError`` / ``TypeError``
naming the argument (mmdet asserts), ``in_channels`` may be a tuple, and the config dicts passed in
are never mutated.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from torch import Tensor, nn

from ...registry import MODELS
from ..config_utils import copy_cfg

__all__ = ["FPN"]

_EXTRA_CONVS = ("on_input", "on_lateral", "on_output")


@MODELS.register_module()
class FPN(BaseModule):
    """Feature Pyramid Network (Lin et al., 2017), as mmdet's.

    Args:
        in_channels: channels of each backbone level given to ``forward``.
        out_channels: channels of every output level.
        num_outs: number of output levels; those beyond the backbone levels used are extra
            levels, each half the size of the previous one.
        start_level, end_level: first and last (inclusive; -1: the last) backbone level used.
            With an ``end_level`` before the last level there are no extra levels:
            ``num_outs == end_level - start_level + 1``.
        add_extra_convs: how the extra levels are made. False: max-pooling (kernel 1, stride 2)
            of the last output; otherwise a stride-2 3x3 conv of ``'on_input'`` (the last backbone
            level used; also what True means), ``'on_lateral'`` (the last lateral) or
            ``'on_output'`` (the last output) for the first extra level, and of the previous
            level for the next ones.
        relu_before_extra_convs: ReLU before the extra convs after the first.
        no_norm_on_lateral: no norm in the lateral convs even with ``norm_cfg``.
        conv_cfg, norm_cfg, act_cfg: for mmcv's ``ConvModule`` (default: plain conv with bias,
            no norm, no activation).
        upsample_cfg: keyword arguments of ``F.interpolate`` for the top-down path; without
            ``scale_factor`` each level is resized to the size of the one below.
        init_cfg: mmengine init config (Xavier-uniform for ``Conv2d``, as mmdet; deformable convs
            keep their own init and zero offset generators).

    ``forward(inputs)`` takes ``len(in_channels)`` maps (finest first) and returns ``num_outs`` maps
    of ``out_channels`` channels, finest first.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int, start_level: int = 0,
                 end_level: int = -1, add_extra_convs: Union[bool, str] = False,
                 relu_before_extra_convs: bool = False, no_norm_on_lateral: bool = False,
                 conv_cfg: Optional[dict] = None, norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None,
                 upsample_cfg: dict = dict(mode="nearest"),  # noqa: B006 (never mutated)
                 init_cfg=dict(type="Xavier", layer="Conv2d", distribution="uniform")) -> None:  # noqa: B006
        super().__init__(init_cfg=init_cfg)  # BaseModule stores a deep copy
        if isinstance(in_channels, (str, bytes)) or not isinstance(in_channels, Sequence) or not in_channels:
            raise TypeError(f"in_channels must be a non-empty list of ints, got in_channels={in_channels!r}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_ins = len(self.in_channels)
        self.num_outs = num_outs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.no_norm_on_lateral = no_norm_on_lateral
        self.conv_cfg = copy_cfg(conv_cfg, "conv_cfg")
        self.norm_cfg = copy_cfg(norm_cfg, "norm_cfg")
        self.act_cfg = copy_cfg(act_cfg, "act_cfg")
        self.upsample_cfg = copy_cfg(upsample_cfg, "upsample_cfg") or {}

        if not 0 <= start_level < self.num_ins:
            raise ValueError(f"start_level must be in 0..{self.num_ins - 1} "
                             f"(len(in_channels)={self.num_ins}), got start_level={start_level!r}")
        if end_level == -1 or end_level == self.num_ins - 1:
            self.backbone_end_level = self.num_ins
            if num_outs < self.num_ins - start_level:
                raise ValueError(f"num_outs must be at least the number of levels used, "
                                 f"len(in_channels) - start_level = {self.num_ins - start_level}, "
                                 f"got num_outs={num_outs!r}")
        else:
            if not start_level <= end_level < self.num_ins:
                raise ValueError(f"end_level must be -1 or in start_level..len(in_channels) - 1 = "
                                 f"{start_level}..{self.num_ins - 1}, got end_level={end_level!r}")
            # No extra level when the last backbone level is left out.
            self.backbone_end_level = end_level + 1
            if num_outs != end_level - start_level + 1:
                raise ValueError(f"num_outs must be end_level - start_level + 1 = "
                                 f"{end_level - start_level + 1} when end_level is not the last level, "
                                 f"got num_outs={num_outs!r}")
        self.start_level = start_level
        self.end_level = end_level

        if isinstance(add_extra_convs, str):
            if add_extra_convs not in _EXTRA_CONVS:
                raise ValueError(f"add_extra_convs must be a bool or one of {_EXTRA_CONVS}, "
                                 f"got add_extra_convs={add_extra_convs!r}")
        elif isinstance(add_extra_convs, bool):
            add_extra_convs = "on_input" if add_extra_convs else False
        else:
            raise ValueError(f"add_extra_convs must be a bool or one of {_EXTRA_CONVS}, "
                             f"got add_extra_convs={add_extra_convs!r}")
        self.add_extra_convs = add_extra_convs

        def conv(cin: int, kernel_size: int, norm_cfg: Optional[dict], **kwargs) -> ConvModule:
            return ConvModule(cin, out_channels, kernel_size, conv_cfg=self.conv_cfg, norm_cfg=norm_cfg,
                              act_cfg=self.act_cfg, inplace=False, **kwargs)

        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(start_level, self.backbone_end_level):
            self.lateral_convs.append(conv(self.in_channels[i], 1,
                                           None if no_norm_on_lateral else self.norm_cfg))
            self.fpn_convs.append(conv(out_channels, 3, self.norm_cfg, padding=1))

        extra_levels = num_outs - self.backbone_end_level + start_level
        if self.add_extra_convs:
            for i in range(extra_levels):
                cin = (self.in_channels[self.backbone_end_level - 1]
                       if i == 0 and self.add_extra_convs == "on_input" else out_channels)
                self.fpn_convs.append(conv(cin, 3, self.norm_cfg, stride=2, padding=1))

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN got {len(inputs)} input levels but was built for "
                             f"len(in_channels)={len(self.in_channels)} (in_channels={self.in_channels})")
        laterals: List[Tensor] = [conv(inputs[i + self.start_level])
                                  for i, conv in enumerate(self.lateral_convs)]

        used = len(laterals)
        for i in range(used - 1, 0, -1):
            if "scale_factor" in self.upsample_cfg:
                up = F.interpolate(laterals[i], **self.upsample_cfg)
            else:
                up = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], **self.upsample_cfg)
            laterals[i - 1] = laterals[i - 1] + up

        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]

        if self.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    source = inputs[self.backbone_end_level - 1]
                elif self.add_extra_convs == "on_lateral":
                    source = laterals[-1]
                else:
                    source = outs[-1]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    x = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](x))
        return tuple(outs)
