"""What every detector shares: ``backbone`` -> optional ``neck``, built from config, as an mmengine
``BaseModel`` with the data preprocessor."""

from __future__ import annotations

import copy

from mmengine.model import BaseModel
from torch import Tensor

from ...registry import MODELS

__all__ = ["BaseDetector"]


class BaseDetector(BaseModel):
    """Builds ``backbone``, ``neck`` (optional) and ``data_preprocessor`` from their configs."""

    def __init__(self, backbone: dict, neck: dict | None = None, data_preprocessor: dict | None = None,
                 init_cfg=None):
        if isinstance(data_preprocessor, dict):
            # Built from this package's registry, so no default scope is needed outside a Runner.
            data_preprocessor = MODELS.build(copy.deepcopy(data_preprocessor))
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(copy.deepcopy(backbone))
        self.neck = MODELS.build(copy.deepcopy(neck)) if neck is not None else None

    def extract_feat(self, inputs: Tensor) -> tuple[Tensor, ...]:
        feats = self.backbone(inputs)
        return self.neck(feats) if self.neck is not None else feats

    @staticmethod
    def add_predictions(data_samples: list, predictions: list) -> list:
        """The data samples, each with its ``pred_instances``."""
        for sample, prediction in zip(data_samples, predictions, strict=True):
            sample.pred_instances = prediction
        return data_samples
