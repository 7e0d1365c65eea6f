"""Single-stage detectors: backbone -> neck -> dense head, as an mmengine ``BaseModel``."""

from __future__ import annotations

import copy

from torch import Tensor

from ...registry import MODELS
from .base import BaseDetector

__all__ = ["SingleStageDetector", "FCOS"]


@MODELS.register_module()
class SingleStageDetector(BaseDetector):
    """``backbone`` -> optional ``neck`` -> ``bbox_head``.

    ``forward(inputs, data_samples, mode)`` with inputs (B, 3, H, W) from the data preprocessor:

    - ``mode='loss'``: dict of scalar losses;
    - ``mode='predict'``: the data samples, each with ``pred_instances`` (boxes in original image
      pixels);
    - ``mode='tensor'``: the head's raw outputs.
    """

    def __init__(self, backbone: dict, bbox_head: dict, neck: dict | None = None,
                 train_cfg: dict | None = None, test_cfg: dict | None = None,
                 data_preprocessor: dict | None = None, init_cfg=None):
        super().__init__(backbone, neck, data_preprocessor, init_cfg)
        bbox_head = copy.deepcopy(bbox_head)
        bbox_head.update(train_cfg=copy.deepcopy(train_cfg), test_cfg=copy.deepcopy(test_cfg))
        self.bbox_head = MODELS.build(bbox_head)

    def forward(self, inputs: Tensor, data_samples: list | None = None, mode: str = "tensor"):
        if mode == "loss":
            return self.bbox_head.loss(self.extract_feat(inputs), data_samples)
        if mode == "predict":
            predictions = self.bbox_head.predict(self.extract_feat(inputs), data_samples)
            return self.add_predictions(data_samples, predictions)
        if mode == "tensor":
            return self.bbox_head(self.extract_feat(inputs))
        raise ValueError(f"{type(self).__name__}.forward: mode must be 'loss', 'predict' or 'tensor', "
                         f"got {mode!r}")


@MODELS.register_module()
class FCOS(SingleStageDetector):
    """FCOS (Tian et al., 2019): a single-stage detector with an ``FCOSHead``."""
