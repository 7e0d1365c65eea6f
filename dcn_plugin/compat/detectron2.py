"""detectron2's ``DeformConv`` and ``ModulatedDeformConv`` (``detectron2.layers``), on ``dcn_plugin.ops``.

Code written for detectron2 changes one import line::

    from dcn_plugin.compat.detectron2 import DeformConv   # was: from detectron2.layers import DeformConv

or calls :func:`install` once, before a model is built, so that detectron2 itself (its ResNet's
``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` blocks included) builds these classes.

Same as detectron2: arguments, defaults and their order (``deformable_groups``, ``norm``,
``activation``; ``DeformConv``'s ``bias=False`` and its assertion), ``forward(x, offset)`` /
``forward(x, offset, mask)`` followed by ``norm`` then ``activation``, an empty input giving an
empty output of the right shape, ``repr``, weight init (``kaiming_uniform_(nonlinearity='relu')``,
bias zero), state_dict keys (``weight``, ``bias``, ``norm.*``) and outputs. Different: forward and
backward run on the CPU (detectron2 raises in the CPU backward, and in ``ModulatedDeformConv``'s CPU
forward) and with ``deformable_groups > 1``, in float16 and bfloat16 too; ``stride``, ``padding`` and
``dilation`` of ``ModulatedDeformConv`` may be pairs. Needs torch only.
"""

from __future__ import annotations

import importlib
from typing import Callable, List, Optional

from torch import Tensor, nn

from .. import ops
from ._common import assert_groups_divide, check_offset_mask, replace_names

__all__ = ["DeformConv", "ModulatedDeformConv", "install"]


class _Detectron2Deform(ops.DeformConv2d):
    """What detectron2's two classes share."""

    _repr_pairs = True

    def _setup(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
               deformable_groups, bias, norm, activation) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias=bool(bias))
        self.deformable_groups = deformable_groups
        self.norm = norm
        self.activation = activation
        # detectron2's repr prints pairs for DeformConv, and the values as given for ModulatedDeformConv.
        given = dict(stride=stride, padding=padding, dilation=dilation)
        self._repr_geometry = {k: getattr(self, k) for k in given} if self._repr_pairs else given

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _apply_op(self, x: Tensor, offset: Tensor, mask: Optional[Tensor]) -> Tensor:
        if x.numel() == 0:
            # detectron2's empty-input path: the output shape, no computation, no norm or activation.
            size = [(i + 2 * p - (d * (k - 1) + 1)) // s + 1 for i, p, d, k, s in
                    zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride)]
            return x.new_zeros([x.shape[0], self.out_channels, *size]) + x.sum() * 0  # keeps x's graph
        name = type(self).__name__
        check_offset_mask(name, x, offset, mask, self.weight, "deformable_groups", self.deformable_groups,
                          mask_given=isinstance(self, ModulatedDeformConv))
        x = ops.deform_conv2d(x, self.weight, offset, mask, self.bias, self.stride, self.padding,
                              self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self._repr_geometry['stride']}, "
                f"padding={self._repr_geometry['padding']}, dilation={self._repr_geometry['dilation']}, "
                f"groups={self.groups}, deformable_groups={self.deformable_groups}, bias={bias}")


class DeformConv(_Detectron2Deform):
    """detectron2's ``DeformConv`` (DCNv1): ``forward(x (B, C_in, H, W), offset)`` with offset
    ``(B, 2 * deformable_groups * kh * kw, H_out, W_out)``; returns ``(B, C_out, H_out, W_out)``
    after ``norm`` and ``activation``. No bias (``bias=True`` fails detectron2's assertion).

    Example:
        >>> conv = DeformConv(8, 16, 3, padding=1, norm=nn.BatchNorm2d(16), activation=torch.relu)
        >>> conv(torch.randn(2, 8, 32, 32), torch.zeros(2, 18, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deformable_groups: int = 1, bias: bool = False,
                 norm: Optional[nn.Module] = None, activation: Optional[Callable[[Tensor], Tensor]] = None):
        assert not bias, f"DeformConv has no bias, got bias={bias!r}"
        assert_groups_divide(in_channels, out_channels, groups)
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                    deformable_groups, False, norm, activation)

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:  # type: ignore[override]
        return self._apply_op(x, offset, None)


class ModulatedDeformConv(_Detectron2Deform):
    """detectron2's ``ModulatedDeformConv`` (DCNv2): ``forward(x (B, C_in, H, W), offset, mask)``
    with offset ``(B, 2 * deformable_groups * kh * kw, H_out, W_out)`` and mask
    ``(B, deformable_groups * kh * kw, H_out, W_out)`` (already activated); returns
    ``(B, C_out, H_out, W_out)`` after ``norm`` and ``activation``.
    """

    _repr_pairs = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deformable_groups: int = 1, bias: bool = True,
                 norm: Optional[nn.Module] = None, activation: Optional[Callable[[Tensor], Tensor]] = None):
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                    deformable_groups, bias, norm, activation)

    @property
    def with_bias(self) -> bool:
        """detectron2's attribute: whether the layer has a bias."""
        return self.bias is not None

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return self._apply_op(x, offset, mask)


_DETECTRON2_MODULES = ("detectron2.layers.deform_conv", "detectron2.layers",
                       "detectron2.modeling.backbone.resnet")


def install() -> List[str]:
    """Makes an installed detectron2 build :class:`DeformConv` and :class:`ModulatedDeformConv`.

    Call once, before the model is built (``build_model(cfg)``). Imports
    ``detectron2.layers.deform_conv``, ``detectron2.layers`` and ``detectron2.modeling.backbone.resnet``,
    then, in every loaded ``detectron2`` module (those three and any other already imported), replaces
    the names ``DeformConv`` and ``ModulatedDeformConv`` that hold detectron2's classes by these.
    Modules imported later that take the names from ``detectron2.layers`` get these too. Calling it
    again changes nothing.

    Returns:
        The names replaced, e.g. ``['detectron2.layers.DeformConv', ...]``.

    Example:
        >>> import dcn_plugin.compat.detectron2 as d2compat
        >>> d2compat.install()
        >>> model = detectron2.modeling.build_model(cfg)   # its deformable blocks are ours
    """
    try:
        modules = [importlib.import_module(name) for name in _DETECTRON2_MODULES]
    except ImportError as exc:
        raise ImportError(f"install() needs detectron2 (its layers and modeling packages): {exc}") from exc
    ours = {"DeformConv": DeformConv, "ModulatedDeformConv": ModulatedDeformConv}
    theirs = {name: getattr(modules[0], name) for name in ours}
    return replace_names(theirs, ours, ["detectron2"])
