"""``nn`` modules for deformable convolution in 1d, 2d and 3d, plain and transposed.

- ``DeformConv{1,2,3}d`` / ``DeformConvTranspose{1,2,3}d`` are built like ``nn.Conv{N}d`` /
  ``nn.ConvTranspose{N}d`` (same arguments, parameter init and state_dict keys ``weight``, ``bias``)
  and take the offset and mask as extra ``forward`` arguments.
- ``PackedDeformConv{1,2,3}d`` / ``PackedDeformConvTranspose{1,2,3}d`` own their offset (and mask)
  generator, a plain convolution named ``conv_offset`` (and ``conv_mask``), zero-initialised.

Shapes, with ``N`` spatial dims and ``K = prod(kernel_size)`` kernel points:

- input ``(B, C_in, *in)`` or unbatched ``(C_in, *in)``
- offset ``(B, offset_groups * N * K, *grid)``; channel ``(g * K + k) * N + d`` holds the
  displacement along spatial dim ``d`` (d, h, w order) of kernel point ``k`` (row-major over the
  kernel) in offset group ``g``
- mask ``(B, mask_groups * K, *grid)``

``grid`` is the output grid for convolution and the input grid for the transposed modules.

Each idea is written once: :class:`_DeformConvNd`, :class:`_DeformConvTransposeNd` and the packed
mixin :class:`_PackedDeformMixin`; the public classes only fix the number of spatial dims.

Deformable RoI pooling: ``DeformRoIPool``, ``DeformRoIPoolPack`` and ``ModulatedDeformRoIPoolPack``
have mmcv's constructor arguments, state_dict keys (``offset_fc.*``, ``mask_fc.*``) and outputs;
``DeformablePSRoIPooling`` has R-FCN's arguments.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.utils import _ntuple, _pair

from .functional import deform_conv, deform_psroi_pool, deform_roi_pool, mask_softmax

__all__ = [
    "DeformConv1d",
    "DeformConv2d",
    "DeformConv3d",
    "DeformConvTranspose1d",
    "DeformConvTranspose2d",
    "DeformConvTranspose3d",
    "PackedDeformConv1d",
    "PackedDeformConv2d",
    "PackedDeformConv3d",
    "PackedDeformConvTranspose1d",
    "PackedDeformConvTranspose2d",
    "PackedDeformConvTranspose3d",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "DeformablePSRoIPooling",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
Activation = Union[None, str, nn.Module]


def _check_padding_mode(padding_mode: str, cls_name: str) -> None:
    if padding_mode != "zeros":
        raise ValueError(
            f"{cls_name}: only padding_mode='zeros' is supported (samples outside the input read "
            f"zero), got padding_mode={padding_mode!r}"
        )


def _dim_of(cls) -> int:
    dim = getattr(cls, "_dim", None)
    if dim not in (1, 2, 3):
        raise TypeError(f"{cls.__name__} is abstract; use its 1d, 2d or 3d subclass")
    return dim


class _DeformConvNd(_ConvNd):
    """N-d deformable convolution; subclasses set ``_dim``. See :class:`DeformConv2d`."""

    _dim: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: Union[str, int, Tuple[int, ...]] = 0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        n = _dim_of(type(self))
        _check_padding_mode(padding_mode, type(self).__name__)
        tup = _ntuple(n)
        super().__init__(
            in_channels, out_channels, tup(kernel_size), tup(stride),
            padding if isinstance(padding, str) else tup(padding), tup(dilation),
            False, tup(0), groups, bias, padding_mode, device=device, dtype=dtype,
        )

    def _conv_forward(
        self,
        input: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        offset: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> Tensor:
        padding = self.padding
        if isinstance(padding, str):
            # 'valid' is no padding; 'same' pads (left, right) per dim with right - left in {0, 1}.
            # The op pads symmetrically; the extra right-hand zero is an explicit F.pad, which is
            # exact because samples outside the input read zero.
            rp = self._reversed_padding_repeated_twice
            n = len(self.kernel_size)
            padding = tuple(rp[2 * (n - 1 - d)] for d in range(n))
            extra = [0] * (2 * n)
            for i in range(n):
                extra[2 * i + 1] = rp[2 * i + 1] - rp[2 * i]
            if any(extra):
                input = F.pad(input, extra)
        return deform_conv(input, weight, offset, mask, bias, self.stride, padding, self.dilation,
                           self.groups)

    def forward(
        self, input: Tensor, offset: Optional[Tensor] = None, mask: Optional[Tensor] = None
    ) -> Tensor:
        """Args:
            input: ``(B, C_in, *in)`` or ``(C_in, *in)``.
            offset: ``(B, offset_groups * N * K, *out)`` or None (no displacement).
            mask: ``(B, mask_groups * K, *out)`` or None (no modulation).

        Returns:
            ``(B, C_out, *out)``, as ``nn.Conv{N}d`` would give.
        """
        return self._conv_forward(input, self.weight, self.bias, offset, mask)


class _DeformConvTransposeNd(_ConvTransposeNd):
    """N-d transposed deformable convolution; subclasses set ``_dim``.

    See :class:`DeformConvTranspose2d`.
    """

    _dim: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        bias: bool = True,
        dilation=1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        n = _dim_of(type(self))
        _check_padding_mode(padding_mode, type(self).__name__)
        if isinstance(padding, str):
            raise ValueError(
                f"{type(self).__name__}: string padding is not supported for transposed convolution, "
                f"got padding={padding!r}"
            )
        tup = _ntuple(n)
        super().__init__(
            in_channels, out_channels, tup(kernel_size), tup(stride), tup(padding), tup(dilation),
            True, tup(output_padding), groups, bias, padding_mode, device=device, dtype=dtype,
        )

    def _conv_forward(
        self,
        input: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        offset: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        output_size: Optional[List[int]] = None,
    ) -> Tensor:
        output_padding = self._output_padding(
            input, output_size, list(self.stride), list(self.padding), list(self.kernel_size),
            len(self.kernel_size), list(self.dilation),
        )
        return deform_conv(input, weight, offset, mask, bias, self.stride, self.padding, self.dilation,
                           self.groups, transposed=True, output_padding=output_padding)

    def forward(
        self,
        input: Tensor,
        offset: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        output_size: Optional[List[int]] = None,
    ) -> Tensor:
        """Args:
            input: ``(B, C_in, *in)`` or ``(C_in, *in)``.
            offset: ``(B, offset_groups * N * K, *in)`` or None; lives on the input grid.
            mask: ``(B, mask_groups * K, *in)`` or None; lives on the input grid.
            output_size: optional output size, as for ``nn.ConvTranspose{N}d``.

        Returns:
            ``(B, C_out, *out)``, as ``nn.ConvTranspose{N}d`` would give.
        """
        return self._conv_forward(input, self.weight, self.bias, offset, mask, output_size)


class _MaskSoftmax(nn.Module):
    """DCNv3 mask activation: softmax over the ``K`` kernel points of each mask group."""

    def __init__(self, kernel_size: Tuple[int, ...]) -> None:
        super().__init__()
        self.kernel_size = tuple(kernel_size)

    def forward(self, mask: Tensor) -> Tensor:
        return mask_softmax(mask, self.kernel_size, len(self.kernel_size))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


def check_groups(value, name: str, channels: int, channels_name: str, owner: str) -> int:
    """Validates an offset/mask group count: a positive int dividing ``channels``."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {name}={value!r}")
    if channels % value != 0:
        raise ValueError(
            f"{owner}: {name} must divide {channels_name}, got {name}={value} and "
            f"{channels_name}={channels}"
        )
    return value


def rename_deformable_groups(owner: str, kwargs: dict, stacklevel: int = 2) -> None:
    """mmcv's legacy keyword, in ``kwargs`` in place: ``deformable_groups`` becomes ``deform_groups``
    (same meaning) with mmcv's ``DeprecationWarning``; both given is a ``TypeError`` naming ``owner``.
    ``stacklevel`` is ``warnings.warn``'s, counted from the function that calls this one."""
    if "deformable_groups" not in kwargs:
        return
    legacy = kwargs.pop("deformable_groups")
    if kwargs.get("deform_groups") is not None:
        raise TypeError(f"{owner}: got deform_groups={kwargs['deform_groups']} and its legacy name "
                        f"deformable_groups={legacy}; pass deform_groups only")
    warnings.warn(f'"deformable_groups" is deprecated in `{owner}.__init__`, please use "deform_groups" '
                  "instead", DeprecationWarning, stacklevel=stacklevel + 1)
    kwargs["deform_groups"] = legacy


def upgrade_version1_offset_keys(state_dict, prefix: str, local_metadata: dict) -> None:
    """mmcv's in-layer checkpoint upgrade, for a layer whose offset generator is ``conv_offset``.

    In version-1 checkpoints (mmcv's early DCN layers) the generator sat beside the layer:
    ``<layer>_offset.{weight,bias}`` instead of ``<layer>.conv_offset.{weight,bias}``. Call from
    ``_load_from_state_dict`` with its arguments; renames those keys in place where the layer's
    metadata says version < 2 (or none) and the new key is absent. It only fires when the loader
    hands the layer keys outside its prefix, which neither torch's ``Module.load_state_dict`` nor
    mmengine 0.10's ``load_state_dict`` does (each child sees only the keys under its prefix), as
    with mmcv's layers; for those loaders see ``dcn_plugin.layers.upgrade_dcn_state_dict``.
    """
    version = local_metadata.get("version", None)
    if (version is None or version < 2) and prefix:
        for suffix in ("weight", "bias"):
            old, new = f"{prefix[:-1]}_offset.{suffix}", f"{prefix}conv_offset.{suffix}"
            if new not in state_dict and old in state_dict:
                state_dict[new] = state_dict.pop(old)


def make_mask_activation(spec: Activation, kernel_size: Tuple[int, ...], owner: str) -> Optional[nn.Module]:
    """``'sigmoid'`` (DCNv2), ``'softmax'`` (DCNv3, over the K kernel points), None or a module."""
    if spec is None or isinstance(spec, nn.Module):
        return spec
    if spec == "sigmoid":
        return nn.Sigmoid()
    if spec == "softmax":
        return _MaskSoftmax(kernel_size)
    raise ValueError(f"{owner}: mask_activation must be None, 'sigmoid', 'softmax' or an nn.Module, "
                     f"got mask_activation={spec!r}")


class _PackedDeformMixin:
    """Owns the offset/mask generators of a packed module (one implementation for all of them).

    ``conv_offset``: ``nn.Conv{N}d`` with ``offset_groups * N * K`` output channels (absent when
    ``deformable=False``); ``conv_mask``: ``nn.Conv{N}d`` with ``mask_groups * K`` output channels
    (only when ``modulated=True``). Both are zero-initialised, and stay zero after every
    ``reset_parameters()``, so at initialisation the offsets are zero and the mask is
    ``mask_activation(0)``: ``0.5`` for ``'sigmoid'`` (the output is ``0.5 * conv(x) + bias``),
    ``1 / K`` for ``'softmax'`` and ``0`` for ``None``.
    """

    conv_offset: Optional[nn.Module]
    conv_mask: Optional[nn.Module]

    def _build_generators(
        self,
        sampled_channels: int,
        sampled_name: str,
        generator_kwargs: dict,
        offset_groups: int,
        mask_groups: int,
        deformable: bool,
        modulated: bool,
        offset_activation: Activation,
        mask_activation: Activation,
        device,
        dtype,
    ) -> None:
        name = type(self).__name__
        sampled = (sampled_channels, sampled_name, name)
        self.offset_groups = check_groups(offset_groups, "offset_groups", *sampled)
        self.mask_groups = check_groups(mask_groups, "mask_groups", *sampled)
        self.deformable = bool(deformable)
        self.modulated = bool(modulated)
        n = len(self.kernel_size)
        k = 1
        for size in self.kernel_size:
            k *= size
        conv = _CONV[n]
        factory = {"device": device, "dtype": dtype}
        # Registered even when absent (None), so that the module's children are fixed at build time.
        self.register_module(
            "conv_offset",
            conv(self.in_channels, self.offset_groups * n * k, **generator_kwargs, **factory)
            if self.deformable else None,
        )
        self.register_module(
            "conv_mask",
            conv(self.in_channels, self.mask_groups * k, **generator_kwargs, **factory)
            if self.modulated else None,
        )
        # Validated even when unused; kept only where there is something to activate.
        if not (offset_activation is None or isinstance(offset_activation, nn.Module)):
            raise ValueError(f"{name}: offset_activation must be None or an nn.Module, "
                             f"got offset_activation={offset_activation!r}")
        mask_activation = make_mask_activation(mask_activation, self.kernel_size, name)
        self.offset_activation = offset_activation if self.deformable else None
        self.mask_activation = mask_activation if self.modulated else None
        self._reset_generators()

    def _reset_generators(self) -> None:
        for generator in (self.conv_offset, self.conv_mask):
            if generator is not None:
                init.zeros_(generator.weight)
                init.zeros_(generator.bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # _ConvNd.__init__ calls this before the generators exist.
        if "conv_offset" in self._modules:
            self._reset_generators()

    def offset_mask(self, input: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The activated offset and mask this module applies to ``input`` (None where absent)."""
        offset = mask = None
        if self.conv_offset is not None:
            offset = self.conv_offset(input)
            if self.offset_activation is not None:
                offset = self.offset_activation(offset)
        if self.conv_mask is not None:
            mask = self.conv_mask(input)
            if self.mask_activation is not None:
                mask = self.mask_activation(mask)
        return offset, mask

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.mask_groups != 1:
            s += f", mask_groups={self.mask_groups}"
        if not self.deformable:
            s += ", deformable=False"
        if self.modulated:
            s += ", modulated=True"
        return s


class _PackedDeformConvNd(_PackedDeformMixin, _DeformConvNd):
    """Deformable convolution with its own zero-initialised offset/mask generators.

    See :class:`PackedDeformConv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: Union[str, int, Tuple[int, ...]] = 0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        offset_groups: int = 1,
        mask_groups: int = 1,
        deformable: bool = True,
        modulated: bool = False,
        offset_activation: Activation = None,
        mask_activation: Activation = "sigmoid",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        # The generators see the same window as the deformable kernel: same output grid.
        generator_kwargs = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                dilation=self.dilation)
        self._build_generators(in_channels, "in_channels", generator_kwargs, offset_groups, mask_groups,
                               deformable, modulated, offset_activation, mask_activation, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        """``input``: ``(B, C_in, *in)`` or ``(C_in, *in)``; returns ``(B, C_out, *out)``."""
        offset, mask = self.offset_mask(input)
        return self._conv_forward(input, self.weight, self.bias, offset, mask)


class _PackedDeformConvTransposeNd(_PackedDeformMixin, _DeformConvTransposeNd):
    """Transposed deformable convolution with its own zero-initialised offset/mask generators.

    The generators are pointwise (kernel 1, stride 1) convolutions on the input grid, where the
    transposed op's offset and mask live. See :class:`PackedDeformConvTranspose2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        bias: bool = True,
        dilation=1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        offset_groups: int = 1,
        mask_groups: int = 1,
        deformable: bool = True,
        modulated: bool = False,
        offset_activation: Activation = None,
        mask_activation: Activation = "sigmoid",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups,
                         bias, dilation, padding_mode, device, dtype)
        self._build_generators(out_channels, "out_channels", dict(kernel_size=1), offset_groups, mask_groups,
                               deformable, modulated, offset_activation, mask_activation, device, dtype)

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        """``input``: ``(B, C_in, *in)`` or ``(C_in, *in)``; returns ``(B, C_out, *out)``."""
        offset, mask = self.offset_mask(input)
        return self._conv_forward(input, self.weight, self.bias, offset, mask, output_size)


# Public classes: each only fixes the number of spatial dimensions.


class DeformConv1d(_DeformConvNd):
    """1d deformable convolution, built like ``nn.Conv1d``; ``forward(input, offset=None, mask=None)``.

    input ``(B, C_in, L)``, offset ``(B, offset_groups * K, L_out)``, mask ``(B, mask_groups * K, L_out)``.
    """

    _dim = 1


class DeformConv2d(_DeformConvNd):
    """2d deformable convolution (DCNv1 with an offset, DCNv2 with a mask too), built like ``nn.Conv2d``.

    ``forward(input, offset=None, mask=None)`` with input ``(B, C_in, H, W)``, offset
    ``(B, offset_groups * 2 * K, H_out, W_out)`` (torchvision/mmcv layout: ``(dy, dx)`` per kernel
    point), mask ``(B, mask_groups * K, H_out, W_out)``; returns ``(B, C_out, H_out, W_out)``.

    Example:
        >>> conv = DeformConv2d(8, 16, 3, padding=1)
        >>> x = torch.randn(2, 8, 32, 32)
        >>> conv(x, torch.zeros(2, 18, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """

    _dim = 2


class DeformConv3d(_DeformConvNd):
    """3d deformable convolution, built like ``nn.Conv3d``; ``forward(input, offset=None, mask=None)``.

    input ``(B, C_in, D, H, W)``, offset ``(B, offset_groups * 3 * K, *out)``, mask
    ``(B, mask_groups * K, *out)``.
    """

    _dim = 3


class DeformConvTranspose1d(_DeformConvTransposeNd):
    """1d transposed deformable convolution, built like ``nn.ConvTranspose1d``.

    ``forward(input, offset=None, mask=None, output_size=None)``; input ``(B, C_in, L)``, offset
    ``(B, offset_groups * K, L)`` and mask ``(B, mask_groups * K, L)`` on the input grid.
    """

    _dim = 1


class DeformConvTranspose2d(_DeformConvTransposeNd):
    """2d transposed deformable convolution, built like ``nn.ConvTranspose2d``.

    ``forward(input, offset=None, mask=None, output_size=None)``; input ``(B, C_in, H, W)``, offset
    ``(B, offset_groups * 2 * K, H, W)`` and mask ``(B, mask_groups * K, H, W)`` on the input grid;
    returns ``(B, C_out, H_out, W_out)`` as ``nn.ConvTranspose2d``.
    """

    _dim = 2


class DeformConvTranspose3d(_DeformConvTransposeNd):
    """3d transposed deformable convolution, built like ``nn.ConvTranspose3d``.

    ``forward(input, offset=None, mask=None, output_size=None)``; offset
    ``(B, offset_groups * 3 * K, *in)`` and mask ``(B, mask_groups * K, *in)`` on the input grid.
    """

    _dim = 3


class PackedDeformConv1d(_PackedDeformConvNd, DeformConv1d):
    """:class:`DeformConv1d` with its own offset/mask generators; ``forward(input)``."""


class PackedDeformConv2d(_PackedDeformConvNd, DeformConv2d):
    """:class:`DeformConv2d` with its own offset/mask generators; ``forward(input)``.

    Arguments are those of ``nn.Conv2d`` plus, keyword-only:

    - ``offset_groups`` / ``mask_groups``: groups of input channels sharing an offset / mask;
      each must divide ``in_channels``.
    - ``deformable``: generate offsets (``conv_offset``); ``False`` gives a mask-only layer.
    - ``modulated``: generate a mask (``conv_mask``, DCNv2/DCNv3).
    - ``offset_activation``: None or an ``nn.Module`` applied to the generated offset.
    - ``mask_activation``: ``'sigmoid'`` (DCNv2), ``'softmax'`` (DCNv3: over the K kernel points of
      each mask group), None or an ``nn.Module``.

    The generators are zero-initialised (see :class:`_PackedDeformMixin`): at initialisation the
    layer is ``nn.Conv2d`` (``modulated=False``) or ``0.5 * conv(x) + bias`` (sigmoid mask).

    Example:
        >>> conv = PackedDeformConv2d(8, 16, 3, padding=1, modulated=True)
        >>> conv(torch.randn(2, 8, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """


class PackedDeformConv3d(_PackedDeformConvNd, DeformConv3d):
    """:class:`DeformConv3d` with its own offset/mask generators; see :class:`PackedDeformConv2d`."""


class PackedDeformConvTranspose1d(_PackedDeformConvTransposeNd, DeformConvTranspose1d):
    """:class:`DeformConvTranspose1d` with pointwise offset/mask generators on the input grid.

    ``forward(input, output_size=None)``; see :class:`PackedDeformConvTranspose2d`.
    """


class PackedDeformConvTranspose2d(_PackedDeformConvTransposeNd, DeformConvTranspose2d):
    """:class:`DeformConvTranspose2d` with its own offset/mask generators.

    ``forward(input, output_size=None)``.

    Arguments are those of ``nn.ConvTranspose2d`` plus the keyword-only ones of
    :class:`PackedDeformConv2d`, except that ``offset_groups`` and ``mask_groups`` must divide
    ``out_channels`` (the transposed op samples its output). The generators are pointwise
    convolutions on the input grid, zero-initialised: at initialisation the layer is
    ``nn.ConvTranspose2d`` (``modulated=False``) or ``0.5 * conv_transpose(x) + bias`` (sigmoid mask).
    """


class PackedDeformConvTranspose3d(_PackedDeformConvTransposeNd, DeformConvTranspose3d):
    """:class:`DeformConvTranspose3d` with pointwise offset/mask generators on the input grid."""


# ------------------------------------------------------------------------------------------------
# Deformable RoI pooling


class DeformRoIPool(nn.Module):
    """mmcv's ``DeformRoIPool``: :func:`~dcn_plugin.ops.deform_roi_pool` with fixed parameters.

    ``forward(input (B, C, H, W), rois (R, 5), offset (R, 2, *output_size) or None)`` returns
    ``(R, C, *output_size)``.
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0,
                 gamma: float = 0.1) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
                               self.gamma)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")


def _fc_stack(in_features: int, hidden: int, out_features: int, hidden_layers: int,
              activation: Optional[nn.Module] = None) -> nn.Sequential:
    """mmcv's offset / mask head: ``hidden_layers`` Linear + ReLU, a last Linear (zero-initialised,
    so the layer starts without offsets) and an optional activation."""
    layers: List[nn.Module] = []
    for i in range(hidden_layers):
        layers += [nn.Linear(in_features if i == 0 else hidden, hidden), nn.ReLU(inplace=True)]
    last = nn.Linear(hidden, out_features)
    init.zeros_(last.weight)
    init.zeros_(last.bias)
    return nn.Sequential(*layers, last, *([activation] if activation is not None else []))


class DeformRoIPoolPack(DeformRoIPool):
    """mmcv's ``DeformRoIPoolPack``: the offsets come from the RoI pooled without them, through
    ``offset_fc`` (Linear, ReLU, Linear, ReLU, Linear to ``2 * out_h * out_w``; the last zeroed).

    ``forward(input (B, output_channels, H, W), rois (R, 5))`` returns ``(R, output_channels, *output_size)``.
    """

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_stack(bins * output_channels, deform_fc_channels, 2 * bins, hidden_layers=2)

    def _pool_and_offset(self, input: Tensor, rois: Tensor) -> Tuple[Tensor, Tensor]:
        """The RoIs pooled without offsets, flattened ``(R, C * bins)``, and their offsets."""
        if input.dim() != 4 or input.shape[1] != self.output_channels:
            raise ValueError(f"{type(self).__name__}: input must have shape (B, output_channels="
                             f"{self.output_channels}, H, W), got {tuple(input.shape)}")
        pooled = super().forward(input, rois).flatten(1)
        return pooled, self.offset_fc(pooled).view(-1, 2, *self.output_size)

    def offset_and_mask(self, input: Tensor, rois: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """What the layer learned for ``rois``: offsets ``(R, 2, *output_size)`` (x, then y, in
        units of ``gamma`` times the RoI's size) and the mask ``(R, 1, *output_size)`` (None here)."""
        return self._pool_and_offset(input, rois)[1], None

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        offset, mask = self.offset_and_mask(input, rois)
        pooled = super().forward(input, rois, offset)
        return pooled if mask is None else pooled * mask


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """mmcv's ``ModulatedDeformRoIPoolPack``: :class:`DeformRoIPoolPack` times a mask per bin from
    ``mask_fc`` (Linear, ReLU, Linear to ``out_h * out_w`` (zeroed), Sigmoid): 0.5 at initialisation.
    """

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1) -> None:
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio,
                         gamma)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = _fc_stack(bins * output_channels, deform_fc_channels, bins, hidden_layers=1,
                                 activation=nn.Sigmoid())

    def offset_and_mask(self, input: Tensor, rois: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        pooled, offset = self._pool_and_offset(input, rois)
        return offset, self.mask_fc(pooled).view(-1, 1, *self.output_size)


class DeformablePSRoIPooling(nn.Module):
    """R-FCN's ``DeformablePSROIPooling``: :func:`~dcn_plugin.ops.deform_psroi_pool` with fixed
    parameters; with ``no_trans=True`` it takes no offset (position-sensitive RoI pooling).

    ``forward(input (B, output_dim * group_size^2, H, W), rois (R, 5), offset (R, 2 * classes,
    part_size, part_size))`` returns ``(R, output_dim, pooled_size, pooled_size)``.
    """

    def __init__(self, spatial_scale: float, output_dim: int, group_size: int, pooled_size: int,
                 part_size: Optional[int] = None, sample_per_part: int = 1, trans_std: float = 0.0,
                 no_trans: bool = False) -> None:
        super().__init__()
        self.spatial_scale = float(spatial_scale)
        self.output_dim = output_dim
        self.group_size = group_size
        self.pooled_size = pooled_size
        self.part_size = pooled_size if part_size in (None, 0) else part_size
        self.sample_per_part = sample_per_part
        self.trans_std = float(trans_std)
        self.no_trans = no_trans

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        if self.no_trans:
            offset = None
        elif offset is None:
            raise ValueError("DeformablePSRoIPooling: offset is required unless no_trans=True")
        return deform_psroi_pool(input, rois, offset, self.spatial_scale, self.output_dim, self.group_size,
                                 self.pooled_size, self.part_size, self.sample_per_part, self.trans_std)

    def extra_repr(self) -> str:
        names = ("spatial_scale", "output_dim", "group_size", "pooled_size", "part_size", "sample_per_part",
                 "trans_std", "no_trans")
        return ", ".join(f"{name}={getattr(self, name)}" for name in names)
