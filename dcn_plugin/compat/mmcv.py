"""mmcv-full's deformable ops with ``mmcv.ops``' signatures (mmcv 2.x), on ``dcn_plugin.ops``.

Code written for ``mmcv.ops`` changes one import line::

    from dcn_plugin.compat.mmcv import DeformConv2d   # was: from mmcv.ops import DeformConv2d

Same as mmcv 2.1.0: argument names, order and defaults (``deform_groups``; the legacy keyword
``deformable_groups`` with mmcv's ``DeprecationWarning``; ``DeformConv2d``'s ``bias=False`` and its
assertion), state_dict keys (``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``),
the Pack classes' ``_version = 2`` and the renaming of version-1 keys on load, ``conv_offset`` an
``nn.Conv2d`` child, the modulated mask split (``o1, o2, mask = chunk(out, 3, dim=1)``,
``offset = cat((o1, o2))``, sigmoid mask), parameter initialisation (same random draws in the same
order, so a seed gives mmcv's initial weights), the offset-dtype casting of mixed-precision inputs,
and the outputs.

Different: nothing to compile; bfloat16 works (mmcv 2.1's kernels take float16, float32 and
float64); the RoI pooling runs on the CPU too (mmcv's ``deform_roi_pool`` is CUDA-only; its two
convolutions have CPU kernels); any batch size works (``im2col_step`` is accepted and has no
effect, so mmcv's "batch size must be divisible by im2col_step" assertion never fires); an input
smaller than the kernel needs no padding trick (the output is the same); wrong offset or mask
channel counts raise a ``RuntimeError`` naming the argument. ``DeformConv2d`` has ``bias = None``
(as ``nn.Conv2d(bias=False)``) where mmcv's has no ``bias`` attribute.

Shapes: input ``(B, C_in, H, W)``; offset ``(B, 2 * deform_groups * kh * kw, H_out, W_out)``, per
kernel point (row-major) ``(dy, dx)``; mask ``(B, deform_groups * kh * kw, H_out, W_out)``.
``DeformRoIPool``, ``DeformRoIPoolPack``, ``ModulatedDeformRoIPoolPack`` and ``deform_roi_pool`` are
``dcn_plugin.ops``' (already mmcv's arguments, keys and outputs). Needs torch only.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack, deform_roi_pool
from ..ops.modules import rename_deformable_groups, upgrade_version1_offset_keys
from ._common import assert_groups_divide, check_offset_mask, replace_names

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "deform_conv2d",
    "modulated_deform_conv2d",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "deform_roi_pool",
    "install",
]

IntOrPair = Union[int, Tuple[int, ...]]


def deform_conv2d(input: Tensor,
                  offset: Tensor,
                  weight: Tensor,
                  stride: IntOrPair = 1,
                  padding: IntOrPair = 0,
                  dilation: IntOrPair = 1,
                  groups: int = 1,
                  deform_groups: int = 1,
                  bias: bool = False,
                  im2col_step: int = 32) -> Tensor:
    """mmcv's ``deform_conv2d`` (DCNv1): same arguments in the same order.

    Args:
        input: ``(B, C_in, H, W)``.
        offset: ``(B, 2 * deform_groups * kh * kw, H_out, W_out)``.
        weight: ``(C_out, C_in / groups, kh, kw)``.
        stride, padding, dilation: int or pair.
        groups, deform_groups: convolution groups; input-channel groups sharing an offset.
        bias: must be False, as in mmcv (this op has no bias).
        im2col_step: accepted for mmcv's callers; no effect (any batch size works).

    Returns:
        ``(B, C_out, H_out, W_out)``, in the offset's dtype (mmcv casts input and weight to it).
    """
    assert bias is False, f"deform_conv2d: only bias=False is supported, got bias={bias!r}"
    check_offset_mask("deform_conv2d", input, offset, None, weight, "deform_groups", deform_groups)
    input, weight = (t.to(offset.dtype) for t in (input, weight))
    return ops.deform_conv2d(input, weight, offset, None, None, stride, padding, dilation, groups)


def modulated_deform_conv2d(input: Tensor,
                            offset: Tensor,
                            mask: Tensor,
                            weight: Tensor,
                            bias: Optional[Tensor] = None,
                            stride: IntOrPair = 1,
                            padding: IntOrPair = 0,
                            dilation: IntOrPair = 1,
                            groups: int = 1,
                            deform_groups: int = 1) -> Tensor:
    """mmcv's ``modulated_deform_conv2d`` (DCNv2): same arguments in the same order.

    Args:
        input: ``(B, C_in, H, W)``.
        offset: ``(B, 2 * deform_groups * kh * kw, H_out, W_out)``.
        mask: ``(B, deform_groups * kh * kw, H_out, W_out)``, already activated.
        weight: ``(C_out, C_in / groups, kh, kw)``; bias: ``(C_out,)`` or None.
        stride, padding, dilation: int or pair.
        groups, deform_groups: convolution groups; input-channel groups sharing an offset and mask.

    Returns:
        ``(B, C_out, H_out, W_out)``, in the offset's dtype (mmcv casts the other tensors to it).
    """
    check_offset_mask("modulated_deform_conv2d", input, offset, mask, weight, "deform_groups", deform_groups,
                      mask_given=True)
    input, weight, mask = (t.to(offset.dtype) for t in (input, weight, mask))
    bias = None if bias is None else bias.to(offset.dtype)
    return ops.deform_conv2d(input, weight, offset, mask, bias, stride, padding, dilation, groups)


def _mmcv_arguments(init):
    """Wraps a layer's ``__init__`` with mmcv's argument handling: the legacy keyword
    ``deformable_groups`` becomes ``deform_groups`` (with mmcv's ``DeprecationWarning``), and a call
    that does not fit the signature raises ``TypeError`` naming the class being built."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        name = type(self).__name__
        rename_deformable_groups(name, kwargs)
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}: {exc}") from None
        init(self, *args, **kwargs)

    return wrapper


class _PackVersion2:
    """State-dict version 2: the offset generator is the child ``conv_offset``. Version-1 keys
    ``<layer>_offset.{weight,bias}`` are renamed on load, as mmcv's Pack classes do."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        upgrade_version1_offset_keys(state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class DeformConv2d(ops.DeformConv2d):
    """mmcv's ``DeformConv2d`` (DCNv1): ``forward(x (B, C_in, H, W), offset)`` with offset
    ``(B, 2 * deform_groups * kh * kw, H_out, W_out)``; returns ``(B, C_out, H_out, W_out)``.

    No bias (``bias=True`` fails mmcv's assertion); ``im2col_step`` has no effect. The weight is
    initialised as mmcv's, ``kaiming_uniform_(nonlinearity='relu')``.

    Example:
        >>> conv = DeformConv2d(8, 16, 3, padding=1, deform_groups=2)
        >>> x = torch.randn(2, 8, 32, 32)
        >>> conv(x, torch.zeros(2, 2 * 2 * 9, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """

    @_mmcv_arguments
    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: IntOrPair,
                 stride: IntOrPair = 1,
                 padding: IntOrPair = 0,
                 dilation: IntOrPair = 1,
                 groups: int = 1,
                 deform_groups: int = 1,
                 bias: bool = False,
                 im2col_step: int = 32) -> None:
        name = type(self).__name__
        assert not bias, f"bias={bias} is not supported in {name}."
        assert_groups_divide(in_channels, out_channels, groups)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False)
        self.deform_groups = deform_groups
        self.im2col_step = im2col_step
        self.output_padding = (0,)  # mmcv's value

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:  # type: ignore[override]
        return deform_conv2d(x, offset, self.weight, self.stride, self.padding, self.dilation, self.groups,
                             self.deform_groups, False, self.im2col_step)

    def __repr__(self) -> str:
        # mmcv's text, one argument a line.
        names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "deform_groups")
        return (f"{type(self).__name__}(" + ",\n".join(f"{n}={getattr(self, n)}" for n in names)
                + ",\nbias=False)")


class DeformConv2dPack(_PackVersion2, DeformConv2d):
    """mmcv's ``DeformConv2dPack`` (``DCN``): :class:`DeformConv2d` with its own offset generator
    ``conv_offset``, an ``nn.Conv2d`` with ``2 * deform_groups * kh * kw`` outputs, zeroed by
    ``init_offset()``. ``forward(x (B, C_in, H, W))``; arguments as :class:`DeformConv2d`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(self.in_channels, self.deform_groups * 2 * kh * kw,
                                     kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                     dilation=self.dilation, bias=True)
        self.init_offset()

    def init_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, self.conv_offset(x))


class ModulatedDeformConv2d(ops.DeformConv2d):
    """mmcv's ``ModulatedDeformConv2d`` (DCNv2): ``forward(x (B, C_in, H, W), offset, mask)`` with
    offset ``(B, 2 * deform_groups * kh * kw, H_out, W_out)`` and mask
    ``(B, deform_groups * kh * kw, H_out, W_out)``; returns ``(B, C_out, H_out, W_out)``.

    ``init_weights()``, as mmcv's: weight uniform in ``+-1 / sqrt(in_channels * kh * kw)``, bias zero.
    """

    @_mmcv_arguments
    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: IntOrPair,
                 stride: int = 1,
                 padding: int = 0,
                 dilation: int = 1,
                 groups: int = 1,
                 deform_groups: int = 1,
                 bias: Union[bool, str] = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias=bool(bias))
        self.deform_groups = deform_groups
        self.output_padding = (0,)  # mmcv's value

    def reset_parameters(self) -> None:
        self.init_weights()

    def init_weights(self) -> None:
        stdv = 1.0 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, self.groups, self.deform_groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", deform_groups={self.deform_groups}"


class ModulatedDeformConv2dPack(_PackVersion2, ModulatedDeformConv2d):
    """mmcv's ``ModulatedDeformConv2dPack`` (``DCNv2``): :class:`ModulatedDeformConv2d` with its own
    generator ``conv_offset``, an ``nn.Conv2d`` with ``3 * deform_groups * kh * kw`` outputs split
    as mmcv does (``o1, o2, mask = chunk(out, 3, dim=1)``; offset ``cat((o1, o2))``; mask
    ``sigmoid(mask)``), zeroed by ``init_weights()``. ``forward(x (B, C_in, H, W))``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(self.in_channels, self.deform_groups * 3 * kh * kw,
                                     kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                     dilation=self.dilation, bias=True)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "conv_offset"):  # not yet while the base class is built
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return super().forward(x, torch.cat((o1, o2), dim=1), torch.sigmoid(mask))


#: OpenMMLab packages whose loaded modules ``install()`` updates.
OPENMMLAB_PACKAGES = ("mmcv", "mmdet", "mmseg", "mmpose", "mmrotate", "mmdet3d", "mmyolo", "mmaction",
                      "mmocr", "mmtrack", "mmflow", "mmedit", "mmagic", "mmpretrain")


def install() -> list:
    """Makes ``mmcv.ops`` (mmcv-full's) serve these classes and functions under its names.

    Afterwards ``mmcv.ops.DeformConv2d``... are this module's, and so are the same names in every
    loaded module of mmcv and the OpenMMLab packages that took them from ``mmcv.ops`` (matched by
    identity; e.g. mmdetection's heads, once imported), and mmdetection's RoI extractors resolve the
    ``roi_layer`` types ``'DeformRoIPoolPack'`` and ``'ModulatedDeformRoIPoolPack'`` to ours, which
    run on the CPU too. Call it before the models are built; ``import dcn_plugin.compat.mmcv_ops``
    (e.g. in a config's ``custom_imports``) calls it. Calling it again changes nothing.

    Returns:
        The names replaced, e.g. ``['mmcv.ops.DeformConv2d', ...]``.
    """
    try:
        mmcv_ops = importlib.import_module("mmcv.ops")
    except ImportError as exc:
        raise ImportError(f"install() needs mmcv-full (mmcv.ops with its compiled ops): {exc}") from exc
    ours = {name: globals()[name] for name in __all__ if name != "install"}
    theirs = {name: getattr(mmcv_ops, name) for name in ours}
    return replace_names(theirs, ours, OPENMMLAB_PACKAGES)
