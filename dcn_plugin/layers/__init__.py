"""Config-facing DCN and RoI pooling layers, registered in mmengine's MODELS registries (needs
mmengine, not mmcv).

Importing this package (or ``dcn_plugin``, or ``custom_imports=dict(imports=['dcn_plugin'])``)
registers:

- in the ``dcn_plugin`` scope: ``dcn_plugin.DCN``, ``dcn_plugin.DCNv2``, ...,
  ``dcn_plugin.DeformRoIPoolPack``, ... (these resolve from any OpenMMLab config even without the
  import, see ``dcn_plugin.registry``);
- in mmengine's root registry, the bare names ``DCN``, ``DCNv2``, ``DCNv3``, ``DCN1d``, ``DCN3d``,
  ``DCNTranspose{1,2,3}d``, so that ``conv_cfg=dict(type='DCN')`` builds these layers through
  mmcv's ``build_conv_layer`` / ``ConvModule``; and ``DeformRoIPool``, ``DeformRoIPoolPack``,
  ``ModulatedDeformRoIPoolPack``, ``DeformablePSRoIPooling`` (the ``dcn_plugin.ops`` modules, which
  have mmcv's and R-FCN's arguments; mmcv 2.x registers its RoI pooling modules nowhere, and
  mmdetection's RoI extractors look ``roi_layer`` types up in ``mmcv.ops`` by name).

It also registers ``DCNOptimWrapperConstructor`` (``paramwise_cfg=dict(dcn_offset_lr_mult=...)``
for these layers; see ``dcn_plugin.layers.optim``).

mmcv-full registers ``DCN`` and ``DCNv2`` in the root registry too, and registering a taken name
raises ``KeyError``. So that the import order does not matter, mmcv-full's ops (``mmcv.ops``) are
imported first where they can be (with mmcv-lite the import fails and is skipped), and then the
bare names are taken over deliberately (``force=True``): our layers load mmcv's checkpoints and
give the same outputs. Registration logs at DEBUG level; only a takeover of mmcv-full's names is
logged at INFO, since it changes what an existing config builds.
"""

from __future__ import annotations

import importlib
import logging
import sys

from .._extras import installed, require

require("dcn_plugin.layers", ["mmengine"])

from mmengine.logging import print_log  # noqa: E402
from mmengine.registry import MODELS as ROOT_MODELS  # noqa: E402

from ..ops import (  # noqa: E402
    DeformablePSRoIPooling,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
)
from ..registry import MODELS  # noqa: E402
from .dcn import (  # noqa: E402
    DCN,
    DCN1d,
    DCN3d,
    DCNTranspose1d,
    DCNTranspose2d,
    DCNTranspose3d,
    DCNv2,
    DCNv3,
    DeformGenerator,
)
from .optim import DCNOptimWrapperConstructor  # noqa: E402
from .upgrade import register_dcn_upgrade_hook, upgrade_dcn_state_dict  # noqa: E402

__all__ = [
    "DCN",
    "DCNv2",
    "DCNv3",
    "DCN1d",
    "DCN3d",
    "DCNTranspose1d",
    "DCNTranspose2d",
    "DCNTranspose3d",
    "DeformGenerator",
    "DCNOptimWrapperConstructor",
    "LAYERS",
    "ROI_LAYERS",
    "upgrade_dcn_state_dict",
    "register_dcn_upgrade_hook",
]

#: Registered name -> layer, in the ``dcn_plugin`` scope and as bare names in the root registry:
#: the deformable convolutions, and the deformable RoI pooling layers.
LAYERS = {cls.__name__: cls for cls in (DCN, DCNv2, DCNv3, DCN1d, DCN3d, DCNTranspose1d,
                                        DCNTranspose2d, DCNTranspose3d)}
ROI_LAYERS = {cls.__name__: cls for cls in (DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack,
                                            DeformablePSRoIPooling)}


def _import_mmcv_ops() -> None:
    """Imports mmcv-full's ops, which register 'DCN'/'DCNv2', before we take those names."""
    if "mmcv.ops" in sys.modules or not installed("mmcv"):
        return
    try:
        importlib.import_module("mmcv.ops")
    except Exception as exc:  # mmcv-lite (no compiled ops) or a broken mmcv-full
        print_log(f"dcn_plugin: mmcv.ops not importable ({type(exc).__name__}: {exc})",
                  logger="current", level=logging.DEBUG)


def _register() -> None:
    layers = {**LAYERS, **ROI_LAYERS}
    for name, cls in layers.items():
        if MODELS.module_dict.get(name) is not cls:
            MODELS.register_module(name=name, module=cls, force=True)
    _import_mmcv_ops()
    taken = []
    for name, cls in layers.items():
        existing = ROOT_MODELS.module_dict.get(name)
        if existing is cls:
            continue
        if existing is not None:
            taken.append(f"{name} (was {existing.__module__}.{existing.__qualname__})")
        ROOT_MODELS.register_module(name=name, module=cls, force=True)
    served = ", ".join(layers)
    note = f"; taken over: {', '.join(taken)}" if taken else ""
    print_log(f"dcn_plugin: {served} are served by dcn_plugin.layers in mmengine's MODELS "
              f"(bare names and 'dcn_plugin.' scope){note}", logger="current",
              level=logging.INFO if taken else logging.DEBUG)


_register()
