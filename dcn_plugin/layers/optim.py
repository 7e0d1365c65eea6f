"""``paramwise_cfg=dict(dcn_offset_lr_mult=...)`` for dcn_plugin's deformable layers.

mmengine's ``DefaultOptimWrapperConstructor`` gives the offset generators of a deformable layer
(``conv_offset``) the learning rate ``lr * dcn_offset_lr_mult``, as Deformable ConvNets trains them,
but it recognises only mmcv-full's ``DeformConv2d`` / ``ModulatedDeformConv2d`` with an
``nn.Conv2d`` generator, and only where ``mmcv._ext`` exists. This constructor applies the same
rule to every deformable convolution of dcn_plugin (1d/2d/3d, transposed, the DCN layers, the
``ops`` modules and the mmcv compatibility classes): their generators ``conv_offset`` (and
``conv_mask``) get ``lr * dcn_offset_lr_mult``; like mmengine, ``bias_lr_mult``,
``bias_decay_mult`` and ``flat_decay_mult`` leave a deformable layer's children alone. Every
other parameter gets exactly mmengine's treatment.

It is registered in the ``dcn_plugin`` scope twice: as ``DCNOptimWrapperConstructor``, and under
mmengine's name ``DefaultOptimWrapperConstructor``, so configs with ``default_scope='dcn_plugin'``
use it with no extra key. Elsewhere (an mmdetection config) set
``optim_wrapper=dict(constructor='dcn_plugin.DCNOptimWrapperConstructor', ...)``.
"""

from __future__ import annotations

from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from ..ops import (
    DeformConv1d,
    DeformConv2d,
    DeformConv3d,
    DeformConvTranspose1d,
    DeformConvTranspose2d,
    DeformConvTranspose3d,
)
from ..registry import OPTIM_WRAPPER_CONSTRUCTORS

__all__ = ["DCNOptimWrapperConstructor", "is_deformable"]

#: The children of a deformable layer that generate its offset and mask.
GENERATORS = ("conv_offset", "conv_mask")
_DEFORMABLE = (DeformConv1d, DeformConv2d, DeformConv3d, DeformConvTranspose1d, DeformConvTranspose2d,
               DeformConvTranspose3d)


def is_deformable(module: nn.Module) -> bool:
    """Whether ``module`` is one of dcn_plugin's deformable convolutions (every layer derives from
    an ``ops`` module)."""
    return isinstance(module, _DEFORMABLE)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="DefaultOptimWrapperConstructor")
@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class DCNOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor, with ``dcn_offset_lr_mult`` applied to dcn_plugin's layers."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None) -> None:
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        self._deformable_prefixes = set()  # module names of the deformable layers met so far

    def add_params(self, params, module, prefix="", is_dcn_module=None) -> None:
        # mmengine tells each child whether its parent is a DCN module, knowing only mmcv's.
        parent, _, child_name = prefix.rpartition(".")
        in_deformable = parent in self._deformable_prefixes
        if is_deformable(module):
            self._deformable_prefixes.add(prefix)
        first = len(params)
        super().add_params(params, module, prefix, is_dcn_module=is_dcn_module or in_deformable or None)
        mult = self.paramwise_cfg.get("dcn_offset_lr_mult")
        if not (in_deformable and child_name in GENERATORS and mult is not None):
            return
        names = {id(p): name for name, p in module.named_parameters(recurse=False)}
        custom_keys = self.paramwise_cfg.get("custom_keys", {})
        for group in params[first:]:
            name = names.get(id(group["params"][0]))
            # custom keys win over every other rule, as in mmengine
            if name is not None and not any(key in f"{prefix}.{name}" for key in custom_keys):
                group["lr"] = self.base_lr * mult
