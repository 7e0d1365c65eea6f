"""Config-facing deformable convolution layers, drop-in for mmcv-full's ``DCN`` / ``DCNv2``.

Each layer is an op module of ``dcn_plugin.ops`` (``DeformConv{N}d`` / ``DeformConvTranspose{N}d``:
same parameters, same op) that owns ONE generator, ``conv_offset``, for its offset and mask, as
mmcv-full's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack`` do, so that mmcv checkpoints load
unchanged (keys ``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``):

- ``conv_offset`` outputs ``deform_groups * N * K`` offset channels (torchvision/mmcv layout: per
  group and kernel point, the N displacements in (d, h, w) order), followed, when ``modulated``,
  by ``mask_groups * K`` mask channels. For 2d with ``mask_groups == deform_groups`` this is
  exactly mmcv's split (``o1, o2, mask = chunk(out, 3, dim=1); offset = cat((o1, o2), dim=1)``).
- the generator is zero-initialised and is not an ``nn.Conv{N}d``: initialisers of a parent that
  target ``layer='Conv2d'`` (mmengine) or ``isinstance(m, nn.Conv2d)`` skip it, so the layer
  starts as a plain convolution (``DCN``) or ``mask_activation(0) * conv`` (modulated) whatever the
  parent's ``init_weights`` does; ``init_weights()`` re-zeroes it too.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.modules import (
    DeformConv1d,
    DeformConv2d,
    DeformConv3d,
    DeformConvTranspose1d,
    DeformConvTranspose2d,
    DeformConvTranspose3d,
    check_groups,
    make_mask_activation,
    rename_deformable_groups,
    upgrade_version1_offset_keys,
)

__all__ = [
    "DeformGenerator",
    "DCN",
    "DCNv2",
    "DCNv3",
    "DCN1d",
    "DCN3d",
    "DCNTranspose1d",
    "DCNTranspose2d",
    "DCNTranspose3d",
]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class DeformGenerator(nn.Module):
    """The offset (and mask) generator: a zero-initialised convolution with parameters
    ``weight (C_out, C_in, *k)`` and ``bias (C_out,)``, the keys of an ``nn.Conv{N}d``.

    Deliberately not an ``nn.Conv{N}d`` subclass, so that a parent's ``Kaiming``/``Xavier``
    initialisation of every ``Conv2d`` leaves it at zero.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, ...],
                 stride: Tuple[int, ...], padding, dilation: Tuple[int, ...],
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        conv = _CONV_FN[len(self.kernel_size)]
        return conv(input, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")


def _legacy_keywords(layer: str, deform_groups: Optional[int], keywords: dict) -> int:
    """``deform_groups`` after mmcv's legacy keyword ``deformable_groups`` (same meaning, with mmcv's
    deprecation warning); any other keyword left in ``keywords`` is an error naming the layer."""
    keywords["deform_groups"] = deform_groups
    rename_deformable_groups(layer, keywords, stacklevel=3)
    deform_groups = keywords.pop("deform_groups")
    if keywords:
        raise TypeError(f"{layer}.__init__() got an unexpected keyword argument {next(iter(keywords))!r}")
    return 1 if deform_groups is None else deform_groups


class _DCNMixin:
    """Builds and applies the layer's generator; mixed into an op module of ``dcn_plugin.ops``."""

    # 2: the generator is the child ``conv_offset``; 1 (mmcv's early layout): it sat beside the
    # layer as ``<name>_offset``.
    _version = 2

    def _build_generator(self, sampled_channels: int, sampled_name: str, deform_groups: int,
                         mask_groups: Optional[int], modulated: bool, mask_activation, geometry: dict,
                         device, dtype) -> None:
        """``geometry``: the generator's kernel_size, stride, padding and dilation."""
        name = type(self).__name__
        mask_groups = deform_groups if mask_groups is None else mask_groups
        sampled = (sampled_channels, sampled_name, name)
        self.offset_groups = check_groups(deform_groups, "deform_groups", *sampled)
        self.mask_groups = check_groups(mask_groups, "mask_groups", *sampled)
        self.modulated = bool(modulated)
        k = math.prod(self.kernel_size)
        self._offset_channels = self.offset_groups * len(self.kernel_size) * k
        mask_channels = self.mask_groups * k if self.modulated else 0
        self.conv_offset = DeformGenerator(self.in_channels, self._offset_channels + mask_channels,
                                           device=device, dtype=dtype, **geometry)
        activation = make_mask_activation(mask_activation, self.kernel_size, name)
        self.mask_activation = activation if self.modulated else None

    @property
    def deform_groups(self) -> int:
        """mmcv's name for ``offset_groups``."""
        return self.offset_groups

    def offset_mask(self, input: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The offset ``(B, deform_groups * N * K, *grid)`` and the activated mask
        ``(B, mask_groups * K, *grid)`` (None unless modulated) this layer applies to ``input``."""
        out = self.conv_offset(input)
        if not self.modulated:
            return out, None
        channel_dim = -(len(self.kernel_size) + 1)
        offset, mask = out.split([self._offset_channels, out.shape[channel_dim] - self._offset_channels],
                                 dim=channel_dim)
        if self.mask_activation is not None:
            mask = self.mask_activation(mask)
        return offset, mask

    def init_weights(self) -> None:
        """Re-zeroes the generator (the layer's own weight and bias are left as they are)."""
        self.conv_offset.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # _ConvNd.__init__ calls this before the generator exists.
        if "conv_offset" in self._modules:
            self.conv_offset.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # mmcv's upgrade of version-1 keys ``<name>_offset.*``; for torch's ``Module.load_state_dict``
        # see ``upgrade_dcn_state_dict`` / ``register_dcn_upgrade_hook``.
        upgrade_version1_offset_keys(state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.offset_groups != 1:
            s += f", deform_groups={self.offset_groups}"
        if self.modulated:
            s += f", mask_groups={self.mask_groups}, mask_activation={type(self.mask_activation).__name__}"
        return s


class _DCNConv(_DCNMixin):
    """Arguments as mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as ``nn.Conv{N}d``.
        deform_groups: groups of input channels sharing an offset (mmcv's name; default 1). mmcv's
            legacy ``deformable_groups`` is accepted with mmcv's deprecation warning.
        bias: None (default) means mmcv's default: True when modulated (``ModulatedDeformConv2d``),
            False otherwise (``DeformConv2d``). ``bias=True`` works for every layer.
        im2col_step: accepted for mmcv compatibility; it has no effect (the kernels bound their
            scratch memory themselves, see ``dcn_plugin.ops.set_workspace_limit``).
        mask_groups: groups of input channels sharing a mask; defaults to ``deform_groups``.
        modulated: generate a mask too (DCNv2/DCNv3).
        mask_activation: ``'sigmoid'`` (DCNv2), ``'softmax'`` (DCNv3: over the K kernel points of
            each mask group), None or an ``nn.Module``.
        padding_mode, device, dtype: as ``nn.Conv{N}d`` (only ``padding_mode='zeros'``).

    The generator sees the same window as the deformable kernel, so its output lies on the
    output grid.
    """

    _default_modulated = False
    _default_mask_activation = "sigmoid"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: Optional[int] = None, bias: Optional[bool] = None,
                 im2col_step=None, *, mask_groups: Optional[int] = None, modulated: Optional[bool] = None,
                 mask_activation="default", padding_mode: str = "zeros", device=None, dtype=None,
                 **legacy) -> None:
        deform_groups = _legacy_keywords(type(self).__name__, deform_groups, legacy)
        modulated = self._default_modulated if modulated is None else bool(modulated)
        if isinstance(mask_activation, str) and mask_activation == "default":
            mask_activation = self._default_mask_activation
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         modulated if bias is None else bool(bias), padding_mode, device, dtype)
        geometry = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                        dilation=self.dilation)
        self._build_generator(in_channels, "in_channels", deform_groups, mask_groups, modulated,
                              mask_activation, geometry, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        """``input``: ``(B, C_in, *in)`` or ``(C_in, *in)``; returns ``(B, C_out, *out)``."""
        offset, mask = self.offset_mask(input)
        return self._conv_forward(input, self.weight, self.bias, offset, mask)


class _DCNConvTranspose(_DCNMixin):
    """Transposed layers; arguments as :class:`_DCNConv` plus keyword ``output_padding``
    (``modulated`` defaults to False, ``mask_activation`` to ``'sigmoid'``).

    The generator is a pointwise convolution on the input grid (where the transposed op's offset
    and mask live); ``deform_groups`` and ``mask_groups`` must divide ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: Optional[int] = None, bias: Optional[bool] = None,
                 im2col_step=None, *, output_padding=0, mask_groups: Optional[int] = None,
                 modulated: bool = False, mask_activation="sigmoid", padding_mode: str = "zeros", device=None,
                 dtype=None, **legacy) -> None:
        deform_groups = _legacy_keywords(type(self).__name__, deform_groups, legacy)
        modulated = bool(modulated)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups,
                         modulated if bias is None else bool(bias), dilation, padding_mode, device, dtype)
        n = len(self.kernel_size)
        geometry = dict(kernel_size=(1,) * n, stride=(1,) * n, padding=(0,) * n, dilation=(1,) * n)
        self._build_generator(out_channels, "out_channels", deform_groups, mask_groups, modulated,
                              mask_activation, geometry, device, dtype)

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        """``input``: ``(B, C_in, *in)`` or ``(C_in, *in)``; returns ``(B, C_out, *out)``."""
        offset, mask = self.offset_mask(input)
        return self._conv_forward(input, self.weight, self.bias, offset, mask, output_size)


class DCN(_DCNConv, DeformConv2d):
    """2d deformable convolution with offsets (DCNv1), drop-in for mmcv's ``DeformConv2dPack``.

    ``conv_offset`` outputs ``2 * deform_groups * K`` channels. Unlike mmcv's, ``bias=True`` works.
    With ``modulated=True`` it is :class:`DCNv2` (except for the bias default).
    """


class DCNv2(DCN):
    """DCNv2: offsets and a sigmoid mask, drop-in for mmcv's ``ModulatedDeformConv2dPack``.

    ``conv_offset`` outputs ``3 * deform_groups * K`` channels: offset, then mask (mmcv's split).
    """

    _default_modulated = True


class DCNv3(DCN):
    """DCNv3-style layer: offsets and a mask normalised by a softmax over the K kernel points of
    each mask group (``mask_activation='softmax'``)."""

    _default_modulated = True
    _default_mask_activation = "softmax"


class DCN1d(_DCNConv, DeformConv1d):
    """1d :class:`DCN`; ``modulated=True`` and ``mask_activation`` give the v2/v3 variants."""


class DCN3d(_DCNConv, DeformConv3d):
    """3d :class:`DCN`; ``modulated=True`` and ``mask_activation`` give the v2/v3 variants."""


class DCNTranspose1d(_DCNConvTranspose, DeformConvTranspose1d):
    """1d transposed deformable convolution with its own generator; see :class:`_DCNConvTranspose`."""


class DCNTranspose2d(_DCNConvTranspose, DeformConvTranspose2d):
    """2d transposed deformable convolution with its own generator; see :class:`_DCNConvTranspose`."""


class DCNTranspose3d(_DCNConvTranspose, DeformConvTranspose3d):
    """3d transposed deformable convolution with its own generator; see :class:`_DCNConvTranspose`."""
