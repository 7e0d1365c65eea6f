"""RoI feature extraction: ``SingleRoIExtractor`` pools each RoI from one pyramid level, with the
RoI layer its config names (RoIAlign, or a deformable RoI pooling layer)."""

from __future__ import annotations

import copy

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from ...layers import ROI_LAYERS
from ...ops import DeformRoIPool
from ...registry import MODELS

__all__ = ["RoIAlign", "SingleRoIExtractor", "build_roi_layer"]


class RoIAlign(DeformRoIPool):
    """mmcv's ``RoIAlign`` with ``aligned=True`` and ``pool_mode='avg'`` (mmdet's default):
    :func:`~dcn_plugin.ops.deform_roi_pool` without offsets.

    ``forward(input (B, C, H, W), rois (R, 5))`` returns ``(R, C, *output_size)``.
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0,
                 pool_mode: str = "avg", aligned: bool = True, use_torchvision: bool = False) -> None:
        if pool_mode != "avg" or not aligned:
            raise ValueError(f"RoIAlign: only pool_mode='avg' with aligned=True is supported, got "
                             f"pool_mode={pool_mode!r}, aligned={aligned}")
        super().__init__(output_size, spatial_scale, sampling_ratio)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(input, rois, None)


#: The RoI layers ``roi_layer=dict(type=...)`` accepts by name (mmcv's names mean ours).
NAMED_ROI_LAYERS = {"RoIAlign": RoIAlign, **{name: cls for name, cls in ROI_LAYERS.items()
                                             if name != "DeformablePSRoIPooling"}}


def build_roi_layer(cfg: dict, spatial_scale: float) -> nn.Module:
    """The RoI layer of ``cfg`` (``type``: a class, a name of :data:`NAMED_ROI_LAYERS`, with or
    without a ``dcn_plugin.`` or ``mmcv.`` prefix, or a name registered in MODELS) for one level."""
    cfg = copy.deepcopy(cfg)
    layer_type = cfg.pop("type")
    if isinstance(layer_type, str):
        name = layer_type.split(".", 1)[1] if layer_type.startswith(("dcn_plugin.", "mmcv.")) else layer_type
        layer_cls = NAMED_ROI_LAYERS.get(name) or MODELS.get(layer_type)
        if layer_cls is None:
            raise KeyError(f"roi_layer: unknown type {layer_type!r}; known: {', '.join(NAMED_ROI_LAYERS)} "
                           "or a layer registered in dcn_plugin's MODELS")
    else:
        layer_cls = layer_type
    return layer_cls(spatial_scale=spatial_scale, **cfg)


@MODELS.register_module()
class SingleRoIExtractor(BaseModule):
    """Pools each RoI from the pyramid level of its size (mmdet's ``SingleRoIExtractor``).

    A RoI of scale ``s = sqrt(w * h)`` goes to level ``floor(log2(s / finest_scale))``, clamped to
    the levels there are. ``roi_layer`` is built once per level with ``spatial_scale = 1 / stride``.

    ``forward(feats (per level (B, C, H_i, W_i)), rois (R, 5))`` returns ``(R, C, *output_size)``.
    """

    def __init__(self, roi_layer: dict, out_channels: int, featmap_strides, finest_scale: int = 56,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.out_channels = out_channels
        self.featmap_strides = list(featmap_strides)
        self.finest_scale = finest_scale
        self.roi_layers = nn.ModuleList(build_roi_layer(roi_layer, 1.0 / s) for s in self.featmap_strides)
        self.output_size = tuple(self.roi_layers[0].output_size)

    def map_roi_levels(self, rois: Tensor) -> Tensor:
        """(R,) int64 level of each RoI."""
        scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(min=0, max=len(self.featmap_strides) - 1).long()

    def forward(self, feats: tuple[Tensor, ...], rois: Tensor) -> Tensor:
        feats = feats[:len(self.featmap_strides)]
        out = feats[0].new_zeros(len(rois), self.out_channels, *self.output_size)
        if len(feats) == 1:
            return self.roi_layers[0](feats[0], rois)
        levels = self.map_roi_levels(rois)
        for level, (feat, layer) in enumerate(zip(feats, self.roi_layers, strict=True)):
            index = (levels == level).nonzero().flatten()
            if len(index):
                out[index] = layer(feat, rois[index]).to(out.dtype)
            else:
                # A zero term that still reaches the level's parameters (DDP wants every gradient).
                out = out + sum(p.sum() for p in layer.parameters()) * 0.0 + feat.sum() * 0.0
        return out
